"""Train one persona's LoRA adapter on a chat base (QLoRA nf4 on CUDA, plain LoRA on CPU).

    python llm.py --persona girl --data data/en/girl.jsonl
    python llm.py --persona girl --data data/girl.jsonl --base Qwen/Qwen1.5-1.8B-Chat --dry-run
    accelerate launch llm.py --persona girl --data data/girl.jsonl --base /models/Qwen1.5-1.8B-Chat

Writes adapters/<persona>/ (adapter weights, tokenizer with its chat template, persona.json); the
folder appears only when training finished.
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from personakit.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent
DEFAULT_SYSTEM = "You are {persona}, chatting with a close friend. Reply in your own voice and answer what they ask."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--persona", required=True, help="persona name; the adapter goes to <output-root>/<persona>/")
    p.add_argument("--data", required=True, help="canonical JSONL written by clear_data.py")
    p.add_argument("--system", default=None, help="system prompt used in training and reused by chat/compare (default: a short neutral persona line)")
    p.add_argument("--base", default=None, help="base model: Hugging Face id or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output-root", default=str(ROOT / "adapters"), help="folder that holds one adapter folder per persona")
    p.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder of this persona")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print a rendered example, counts and LoRA modules, then exit")
    # model loading
    p.add_argument("--cache-dir", default=None, help="where the embedded base is converted (default: $PERSONAKIT_CACHE or ~/.cache/personakit)")
    p.add_argument("--load-in-4bit", default="auto", choices=["auto", "yes", "no"], help="nf4 4-bit base: auto = on CUDA with bitsandbytes")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a base model that ships its own Python code")
    # LoRA
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha")
    # No dropout by default: on CPU it cost 14% of each step (profiled), and the held-out split
    # with early stopping and best-checkpoint selection already guards against memorising.
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--target-modules", nargs="+", default=None, help="linear layer names to adapt (default: every attention and MLP projection)")
    # optimisation
    # Chosen with bench_quality.py (BENCHMARKS.md, Quality), on girl at penalty 1.1: 3e-4 gave 94%
    # persona markers but lost relevance (keyword coverage 77%, the base's 85%); 2e-4 kept it (85%)
    # but markers fell to 88%; 2.5e-4 gave 100% and 92%. The best held-out checkpoint is kept.
    p.add_argument("--learning-rate", type=float, default=2.5e-4, help="peak learning rate")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training rows")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (overrides --epochs when > 0)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per device batch")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="max tokens per example; oldest history is dropped to fit")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps with linear warmup")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--seed", type=int, default=42, help="seed for the split, LoRA init and data order")
    # validation
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of rows held out, at least 10 (none below 50 rows)")
    p.add_argument("--eval-steps", type=int, default=0, help="evaluate and checkpoint every N steps (0 = about 6 times per run)")
    p.add_argument("--early-stopping-patience", type=int, default=2, help="stop after N evaluations without a better val loss (0 = never)")
    p.add_argument("--keep-last", action="store_true", help="keep the final weights instead of the best checkpoint by val loss")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    final_dir = Path(args.output_root) / args.persona
    work_dir = Path(args.output_root) / f".{args.persona}.work"
    if final_dir.exists() and not args.overwrite and not args.dry_run:
        raise UserError(f"{final_dir} already exists; pass --overwrite to replace it or choose another --persona")
    if args.resume and not work_dir.is_dir():
        raise UserError(f"nothing to resume: {work_dir} has no interrupted run of persona {args.persona}; start without --resume")
    system = args.system or DEFAULT_SYSTEM.format(persona=args.persona)
    print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())), flush=True)

    from personakit.data import read_jsonl, sha256_file
    from personakit.loading import load_base, resolve_target_modules
    from personakit.template import require_chat_template, show_example
    from personakit.training import encode_split, library_versions, split_rows

    rows = read_jsonl(args.data)
    loaded = load_base(args.base, cache_dir=args.cache_dir, load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    require_chat_template(loaded.tokenizer)
    train_rows, val_rows = split_rows(rows, args.val_fraction, args.seed)
    split = encode_split(loaded.tokenizer, train_rows, val_rows, system, args.max_length)
    targets = resolve_target_modules(loaded.model, args.target_modules)
    tokens = sum(len(e.input_ids) for e in split.train)
    supervised = sum(sum(1 for t in e.labels if t != -100) for e in split.train)
    print(
        f"data: {len(rows)} rows ({len(split.train)} train, {len(split.val)} val, {split.dropped_too_long} too long), "
        f"{tokens} train tokens of which {supervised} supervised; template check passed on every row",
        flush=True,
    )
    print(f"lora: r={args.lora_r} alpha={args.lora_alpha} on {', '.join(targets)}", flush=True)
    if args.dry_run:
        print("example (supervised part between [[ ]]):\n" + show_example(loaded.tokenizer, split.train[0]))
        return 0

    started = time.time()
    result = train(args, loaded, split, targets, work_dir)
    model = result.pop("_model")
    if not result.pop("_is_main"):
        return 0  # under `accelerate launch`, only the main process writes the adapter
    elapsed = time.time() - started
    meta = {
        "persona": args.persona,
        "system": system,
        "base": {"id": loaded.ref.base_id, "fingerprint": loaded.fingerprint},
        "data": {
            "path": str(Path(args.data)), "sha256": sha256_file(args.data), "rows": len(rows),
            "train_rows": len(split.train), "val_rows": len(split.val), "dropped_too_long": split.dropped_too_long,
            "train_tokens": tokens, "supervised_tokens": supervised,
        },
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("overwrite", "resume", "dry_run")},
        "target_modules": targets,
        "seed": args.seed,
        "device": loaded.device,
        "quantized_4bit": loaded.quantized,
        "versions": library_versions(),
        "results": {**result, "train_seconds": round(elapsed, 1)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_adapter(model, loaded.tokenizer, meta, final_dir, work_dir, args.overwrite)
    r = meta["results"]
    print(
        f"done: {len(split.train)} samples, {r['epochs_run']:.2f} epochs, {r['trained_tokens']} tokens in {elapsed:.0f}s "
        f"({r['trained_tokens'] / max(elapsed, 1e-9):.0f} tokens/s); train loss {r['train_loss']:.3f}, "
        f"{validation_summary(r, len(split.val), len(rows), args.val_fraction)}; adapter in {final_dir}",
        flush=True,
    )
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def validation_summary(r: dict, n_val: int, n_rows: int, val_fraction: float) -> str:
    """Val loss and held-out perplexity with how noisy they are, or why there are none."""
    from personakit.training import no_holdout_reason

    if not n_val:
        return f"{no_holdout_reason(n_rows, val_fraction)}, so no val loss, best-checkpoint choice or held-out perplexity"
    se = r["val_loss_standard_error"]
    # Two standard errors: a smaller val-loss difference between runs is within the noise of this split.
    noise = f" ± {se:.3f} (standard error over {n_val} held-out rows; differences under {2 * se:.3f} are noise)" if se else ""
    return (f"val loss {_fmt(r['val_loss'])}{noise}; "
            f"held-out perplexity base {_fmt(r['base_val_ppl'])} -> tuned {_fmt(r['tuned_val_ppl'])}")


def train(args, loaded, split, targets, work_dir: Path) -> dict:
    """Run SFT with TRL on pre-rendered rows; the returned model holds the best checkpoint by val loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig

    from personakit.perplexity import loss_standard_error, mean_loss, perplexity, reply_nll
    from personakit.sft import EvaluateAtEnd, PersonaSFTTrainer
    from personakit.training import latest_checkpoint, to_dataset

    pad_id = loaded.tokenizer.pad_token_id
    base_ppl = perplexity(loaded.model, split.val, pad_id)
    model = loaded.model
    cuda = loaded.device == "cuda"
    if cuda:
        # PEFT's prepare_model_for_kbit_training would upcast every unquantized weight to fp32:
        # for Qwen's 152k-token embedding and head that alone is ~2.5 GB, a third of an 8 GB card.
        # Checkpointing only needs gradients to flow from the (frozen) embedding output.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    steps_per_epoch = math.ceil(len(split.train) / (args.batch_size * args.grad_accum))
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(steps_per_epoch * args.epochs)
    has_val = bool(split.val)
    eval_steps = args.eval_steps or auto_eval_steps(total_steps)
    config = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(total_steps * args.warmup_ratio),
        weight_decay=args.weight_decay,
        seed=args.seed,
        data_seed=args.seed,
        # bf16 autocast is ~150x slower than fp32 on CPUs without AMX (measured); only use it on CUDA.
        bf16=cuda and loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.bfloat16",
        fp16=cuda and str(loaded.dtype) == "torch.float16",
        # Checkpointing trades compute for memory: needed to fit 8 GB cards, pure loss on CPU.
        activation_checkpointing=cuda,
        dataloader_pin_memory=cuda,
        optim="paged_adamw_8bit" if loaded.quantized else "adamw_torch",
        max_length=None,
        pad_to_multiple_of=8,
        logging_steps=max(1, min(10, eval_steps)),
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val and not args.keep_last,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        report_to="none",
        disable_tqdm=False,  # the progress bar stays even though library logging is quieted
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    callbacks = [EvaluateAtEnd()] if has_val else []
    if has_val and args.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(args.early_stopping_patience))
    trainer = PersonaSFTTrainer(
        model=model,
        args=config,
        train_dataset=to_dataset(split.train),
        eval_dataset=to_dataset(split.val) if has_val else None,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
    resume_from = latest_checkpoint(work_dir) if args.resume else None
    if args.resume and resume_from is None:
        raise UserError(f"{work_dir} holds no checkpoint to resume from; start again without --resume")
    output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    history = trainer.state.log_history
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    trained_tokens = sum(len(e.input_ids) for e in split.train) * trainer.state.epoch
    tuned_nll = reply_nll(trainer.model, split.val, pad_id)
    tuned_ppl = math.exp(mean_loss(tuned_nll)) if tuned_nll else None
    return {
        "_model": trainer.model,
        "_is_main": trainer.is_world_process_zero(),
        "steps": trainer.state.global_step,
        "epochs_run": trainer.state.epoch,
        "trained_tokens": int(trained_tokens),
        "train_loss": output.training_loss,
        # The kept weights' own loss on the held-out replies (token-weighted), whichever checkpoint they are.
        "val_loss": math.log(tuned_ppl) if tuned_ppl else None,
        "val_loss_standard_error": loss_standard_error(tuned_nll),
        "val_loss_history": eval_losses,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
        "base_val_ppl": base_ppl,
        "tuned_val_ppl": tuned_ppl,
    }


def auto_eval_steps(total_steps: int, evaluations: int = 6) -> int:
    """About `evaluations` evenly spaced evaluations, landing on the final step when a near divisor allows.

    (EvaluateAtEnd adds a final evaluation otherwise, so the last weights can always win.)
    """
    target = max(1, round(total_steps / evaluations))
    steps = target
    while total_steps % steps and steps < 2 * target:
        steps += 1
    return steps if total_steps % steps == 0 else target


def save_adapter(model, tokenizer, meta: dict, final_dir: Path, work_dir: Path, overwrite: bool) -> None:
    """Write the adapter into a staging folder beside the final one, then rename it into place."""
    from personakit.training import publish_folder, write_json

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.staging-", dir=final_dir.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        write_json(staging / "persona.json", meta)
        publish_folder(staging, final_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
