"""How well the frozen pre-trained features separate a class-incremental stream's classes and tasks.

HiDe-LoRA (and TreeLoRA in its HiDe form) infer each test example's task from a head on the
pre-trained model's features, then score it with that task's slot. Their final accuracy is bounded by
how often that task is right. This script measures, on the pre-trained features of the stream:

- `ncm`: the nearest class mean over every class (what `fix` scores after the last task);
- `probe`: a linear softmax classifier trained jointly on every class's training data (Adam, L2 `wd`,
  standardised features). With all the data at once it is an upper bound for any rehearsal-free
  head trained task by task on the same features (HiDe's TII head is one);
- for both, `class_accuracy` over all test examples and `task_accuracy` (the predicted class belongs
  to the example's task), i.e. the task-identity accuracy such a head would give.

    python -m experiments.feature_probe                                  # offline-text-cil, seed 0
    python -m experiments.feature_probe --config experiments/configs/offline_lang_cil.py --seeds 0,1,2

Last line: a JSON object {"stream", "seeds": {seed: {"ncm": {...}, "probe": {wd: {...}}}}, "mean": {...}}.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax


def pretrained_features(backbone, split, batch_size: int = 96) -> np.ndarray:
    """[N, d] pooled pre-trained features of a classification split."""
    apply = jax.jit(lambda params, batch: backbone.features(params, batch).astype(jnp.float32))
    inputs = dict(split.inputs)
    count = len(np.asarray(split.labels))
    out = []
    for start in range(0, count, batch_size):
        batch = {name: jnp.asarray(np.asarray(value)[start:start + batch_size]) for name, value in inputs.items()}
        out.append(np.asarray(apply(backbone.params, batch)))
    return np.concatenate(out)


def linear_probe(train_x, train_y, num_classes: int, weight_decay: float, steps: int = 500,
                 learning_rate: float = 1e-2):
    """(predict, (W, b)): a full-batch Adam softmax regression on standardised features."""
    mean, scale = train_x.mean(0), train_x.std(0) + 1e-6
    x, y = jnp.asarray((train_x - mean) / scale), jnp.asarray(train_y)

    def loss(params):
        logits = x @ params[0] + params[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + weight_decay * jnp.sum(params[0] ** 2)

    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state)
        return optax.apply_updates(params, updates), state

    params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return lambda test_x: np.asarray(jnp.asarray((test_x - mean) / scale) @ params[0] + params[1]).argmax(-1)


def scores(predicted, labels, class_task) -> dict:
    return {"class_accuracy": 100.0 * float(np.mean(predicted == labels)),
            "task_accuracy": 100.0 * float(np.mean(class_task[predicted] == class_task[labels]))}


def probe_stream(config, weight_decays=(1e-3, 1e-2)) -> dict:
    from jaxtree_lora import data as data_lib
    from jaxtree_lora.train import backbone as backbone_lib

    backbone = backbone_lib.build(config)
    stream = data_lib.get_stream(config.data, backbone.tokenizer)
    if stream.kind != "classification":
        raise SystemExit(f"feature_probe needs a classification stream; {stream.name} is {stream.kind}")
    num_classes = int(stream.num_classes)
    class_task = np.full((num_classes,), -1)
    for index, task in enumerate(stream.tasks):
        class_task[list(task.classes)] = index
    train_x = np.concatenate([pretrained_features(backbone, task.train) for task in stream.tasks])
    train_y = np.concatenate([np.asarray(task.train.labels) for task in stream.tasks])
    test_x = np.concatenate([pretrained_features(backbone, task.test) for task in stream.tasks])
    test_y = np.concatenate([np.asarray(task.test.labels) for task in stream.tasks])
    means = np.stack([train_x[train_y == c].mean(0) for c in range(num_classes)])
    nearest = ((test_x[:, None, :] - means[None]) ** 2).sum(-1).argmin(-1)
    out = {"stream": stream.name, "ncm": scores(nearest, test_y, class_task), "probe": {}}
    for weight_decay in weight_decays:
        predict = linear_probe(train_x, train_y, num_classes, weight_decay)
        out["probe"][str(weight_decay)] = scores(predict(test_x), test_y, class_task)
    return out


def main(argv=None) -> None:
    from jaxtree_lora import config as config_lib
    from jaxtree_lora.cli import parse_seeds, seeded

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="", help="config file (default experiments/configs/default.py)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (class order and data split)")
    args = parser.parse_args(argv)
    base = config_lib.load(args.config)
    per_seed = {}
    for seed in parse_seeds(args.seeds):
        result = probe_stream(seeded(base, seed))
        per_seed[seed] = result
        print(f"seed {seed}: NCM class {result['ncm']['class_accuracy']:.2f} task {result['ncm']['task_accuracy']:.2f}; "
              + "; ".join(f"probe wd {wd}: class {r['class_accuracy']:.2f} task {r['task_accuracy']:.2f}"
                          for wd, r in result["probe"].items()), flush=True)
    mean = {"ncm": {k: float(np.mean([r["ncm"][k] for r in per_seed.values()])) for k in ("class_accuracy", "task_accuracy")},
            "probe": {wd: {k: float(np.mean([r["probe"][wd][k] for r in per_seed.values()]))
                           for k in ("class_accuracy", "task_accuracy")} for wd in next(iter(per_seed.values()))["probe"]}}
    print(json.dumps({"stream": next(iter(per_seed.values()))["stream"], "seeds": per_seed, "mean": mean}))


if __name__ == "__main__":
    main()
