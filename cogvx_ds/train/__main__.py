"""python -m cogvx_ds.train --config <yaml> [--config <yaml> ...] [section.key=value ...]

Trains the expert transformer on pre-encoded latent shards. Launch with torchrun, srun or the deepspeed
launcher; without a launcher it runs as one process. The config is validated before any process group starts.
Run dir (train.run_dir): metrics.jsonl, sample_order.jsonl, tensorboard/, checkpoints/, config.yaml and, at the
end, final_model/ (diffusers format). A run dir with checkpoints/latest resumes automatically. On SIGTERM or
SIGUSR1 it writes a checkpoint and exits with code 75 (requeue). train.profile_steps=[first,last] writes a
torch.profiler trace of those steps to <run_dir>/profile/ (cogvx_ds/train/profiling.py).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cogvx_ds.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", default=[], metavar="YAML",
                    help="config file or packaged name (model/tiny, stages/lq_pretrain, ...); later ones win")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-4 data.shards=[a/]")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved, validated config and exit (alone: every key with its default). The "
                         "layout is checked against WORLD_SIZE (default 1): WORLD_SIZE=8 ... --print-config checks an "
                         "8-process launch, train.ds_config included")
    # the deepspeed launcher appends --local_rank=N (and sets LOCAL_RANK, which is what is read)
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_intermixed_args(argv)  # --config may come after overrides

    import yaml

    from cogvx_ds.config import ConfigError, _deep_merge, apply_overrides, from_dict, load_yaml_dict, validate
    from cogvx_ds.train.ds_config import build_ds_config
    from cogvx_ds.utils import out_dir_problem, slurm_step_task

    try:
        data: dict = {}
        for path in args.config:
            data = _deep_merge(data, load_yaml_dict(path))
        cfg = from_dict(apply_overrides(data, args.overrides))
        task = slurm_step_task()  # a task of a plain srun step (no torchrun)
        world = int(os.environ.get("WORLD_SIZE", task[1] if task else 1))
        validate(cfg, world_size=world)
        try:  # the DeepSpeed config file too: the launchers' --print-config check runs before any process starts
            build_ds_config(cfg, world)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(str(e)) from None
        if not cfg.data.shards and not args.print_config:  # a config can be inspected before data exists
            raise ConfigError("data.shards = []: give latent shard paths, folders or index.json files")
        problem = None if args.print_config else out_dir_problem(cfg.train.run_dir, "train.run_dir")
        if problem:
            raise ConfigError(problem)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        try:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
        except BrokenPipeError:  # `--print-config | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    from cogvx_ds.utils import single_process_env, tune_malloc

    single_process_env()
    tune_malloc()
    from cogvx_ds.parallel import destroy_distributed
    from cogvx_ds.train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        # a refused resume has its process group up: left open, gloo's threads can abort the interpreter's exit
        # ("terminate called without an active exception", exit code -6 instead of 2; seen once in CI)
        destroy_distributed()
        return 2
    rc = trainer.run()
    destroy_distributed()  # NCCL warns at exit (and some versions hang in teardown) when the group is left open
    return rc


if __name__ == "__main__":
    sys.exit(main())
