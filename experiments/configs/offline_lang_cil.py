"""A second class-incremental text stream: language identification over the ChatterBot corpus.

`offline-lang-cil` (jaxtree_lora/data/offline.py, offline_lang_cil): one class per language, the
texts every conversation turn of every topic file of that language's folder in chatterbot-corpus
1.3.3 (asset "chatterbot_languages", fetched by `jaxtree-lora assets`), deduplicated across the
whole stream; turns found under two languages, and turns of a non-Latin-script language without a
letter of its script, are dropped. The 20 languages with the most such texts, 10 tasks of 2
classes, 40 training and 20 test texts per class (800 / 400 in all; the 20th language, yoruba, has
63 texts, so 48 + 24 would not fit). Class order seeded as for offline-text-cil; the model, method
and training settings are default.py's (all-MiniLM-L6-v2, TreeLoRA), evaluated without task
identity over every class seen so far. Measured, seed 0: fix (the frozen model, nearest class
mean) ends at 85.75 average accuracy (the second command).

    jaxtree-lora run --config experiments/configs/offline_lang_cil.py
    jaxtree-lora run --config experiments/configs/offline_lang_cil.py --config.method.name=fix
"""
import ml_collections

from experiments.configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    config = default.get_config(arg)
    config.data.name = "offline-lang-cil"  # its defaults: 10 tasks, 40 / 20 texts per class (data/sources.py)
    return config
