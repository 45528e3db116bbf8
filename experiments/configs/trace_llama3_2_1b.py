"""TreeLoRA on TRACE with Llama-3.2-1B-Instruct, as the official scripts run it.

Official settings (ZinYY/TreeLoRA `scripts/lora_based_methods/Tree_LoRA.sh`, `training/main.py`;
docs/METHODS.md, TreeLoRA): the 8 TRACE tasks in order C-STANCE, FOMC, MeetingBank, Py150, ScienceQA,
NumGLUE-cm, NumGLUE-ds, 20Minuten; epochs 2,1,3,2,1,2,2,3; Adam(0.9, 0.95), weight decay 0, constant
lr 1e-4, gradient clipping 1.0; 4 data-parallel ranks x micro-batch 1 x accumulation 8 (32 samples
per update; here `train.batch_size=4` split over the `data` axis, `accumulation=8`); lambda 0.5;
LoRA r=8, alpha=32, dropout 0.1 on q_proj and v_proj of every layer; answer-only loss; prompts up to
1024 tokens and answers up to 512; evaluation by sampling at temperature 0.1; seed 1234.

    jaxtree-lora run --config experiments/configs/trace_llama3_2_1b.py \
        --config.model.path=/path/to/Llama-3.2-1B-Instruct --config.data.root=/path/to/TRACE
"""
import ml_collections

from experiments.configs import default
from jaxtree_lora.data import sources as data_sources


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.seed = 1234
    config.model = ml_collections.ConfigDict({
        "name": "hf", "path": "", "kind": "decoder", "compute_dtype": "bfloat16", "remat": True, "tiny": {},
    })
    config.data = data_sources.config_section(
        "trace", root="",
        tasks=["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
        max_train=0, max_eval=0, max_prompt_len=1024, max_answer_len=512, chat_template=False)
    config.method.name = "treelora"
    config.method.treelora.lam = 0.5
    config.lora = ml_collections.ConfigDict({
        "targets": ["attn.q_proj", "attn.v_proj"], "rank": 8, "alpha": 32.0, "dropout": 0.1,
        "init": "kaiming_uniform", "max_modules": -1,
    })
    config.optimizer = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "b1": 0.9, "b2": 0.95, "weight_decay": 0.0, "clip_norm": 1.0, "schedule": "constant",
    })
    config.train.batch_size = 4
    config.train.accumulation = 8
    # Per-task epochs: a list where the default config has an int, so the field is rebuilt.
    config.train = ml_collections.ConfigDict({**config.train.to_dict(), "epochs": [2, 1, 3, 2, 1, 2, 2, 3]})
    config.train.checkpoint_every = 200
    config.eval.temperature = 0.1
    config.eval.batch_size = 8
    return config
