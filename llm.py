"""Train one persona's LoRA adapter on a chat base (QLoRA nf4 on CUDA, plain LoRA on CPU).

    python llm.py --persona girl --data data/en/girl.jsonl
    python llm.py --persona girl --data data/girl.jsonl --base Qwen/Qwen1.5-1.8B-Chat --dry-run
    accelerate launch --multi_gpu --num_processes 2 llm.py --persona girl --data data/girl.jsonl --base /models/Qwen1.5-1.8B-Chat

Writes adapters/<persona>/ (adapter weights, tokenizer with its chat template, persona.json); the
folder appears only when training finished.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from personakit.distributed import is_main_process, print0
from personakit.errors import run_cli
from personakit.flags import check_args, print_config, training_parser
from personakit.options import ModelOptions, TrainConfig, TrainJob

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training_parser(ROOT, __doc__).parse_args(argv)


def main(args: argparse.Namespace) -> int:
    check_args(args)
    if is_main_process():  # under `accelerate launch` every process runs this script; one terminal is enough
        print_config(args)

    from personakit.train import train_persona

    job = TrainJob.from_args(args)
    meta = train_persona(job, ModelOptions.from_args(args), TrainConfig.from_args(args), log=print0)
    if meta is None:
        return 0  # a dry run, or not the main process under `accelerate launch`
    r, seconds = meta.results, meta.results.train_seconds
    processes = f" on {meta.world_size} processes (effective batch {meta.effective_batch_size})" if meta.world_size > 1 else ""
    print(
        f"done: {meta.data.train_rows} samples{processes}, {r.epochs_run:.2f} epochs, {r.trained_tokens} tokens in {seconds:.0f}s "
        f"({r.trained_tokens / max(seconds, 1e-9):.0f} tokens/s); train loss {r.train_loss:.3f}, "
        f"{validation_summary(meta)}; "
        f"adapter in {job.final_dir}",
        flush=True,
    )
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def validation_summary(meta) -> str:
    """Val loss and held-out perplexity with how noisy they are, or why there are none."""
    from personakit.training import no_holdout_reason

    r, n_val = meta.results, meta.data.val_rows
    if not n_val:
        return f"{no_holdout_reason(meta.data.rows, meta.val_fraction)}, so no val loss, best-checkpoint choice or held-out perplexity"
    se = r.val_loss_standard_error
    # Two standard errors: a smaller val-loss difference between runs is within the noise of this split.
    noise = f" ± {se:.3f} (standard error over {n_val} held-out rows; differences under {2 * se:.3f} are noise)" if se else ""
    return f"val loss {_fmt(r.val_loss)}{noise}; held-out perplexity base {_fmt(r.base_val_ppl)} -> tuned {_fmt(r.tuned_val_ppl)}"


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
