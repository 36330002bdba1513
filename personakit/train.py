"""The training core behind llm.py: encode a persona's rows, train a LoRA adapter with TRL, publish the folder.

    meta = train_persona(TrainJob(persona="girl", data="data/en/girl.jsonl"), ModelOptions(), TrainConfig(max_steps=20))

does it all (llm.py builds the three from its flags with `.from_args(args)`); its steps serve callers that need one part (benchmarks, tests):

    prepared = prepare(rows, loaded, system, config)        # split, encode, template check, LoRA targets
    result = run_training(config, loaded, prepared.split, prepared.targets, work_dir, callbacks=[...])
    save_adapter(result.model, loaded.tokenizer, meta, final_dir, work_dir, overwrite)

Measurements hook in as `transformers.TrainerCallback`s passed to `run_training(callbacks=...)`.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from .data import Row
from .distributed import world_size
from .errors import UserError
from .loading import LoadedBase
from .options import ModelOptions, TrainConfig, TrainJob
from .persona import PERSONA_FILE, BaseRecord, DataRecord, PersonaMeta, TrainResults
from .template import IGNORE_INDEX
from .training import EncodedSplit, encode_split, split_rows

DEFAULT_SYSTEM = "You are {persona}, chatting with a close friend. Reply in your own voice and answer what they ask."


@dataclass
class Prepared:
    """Rows split and encoded with the chat template, and the layers LoRA will adapt."""

    split: EncodedSplit
    targets: list[str]
    train_tokens: int
    supervised_tokens: int
    replay_rows: int  # of split.train, the base's own answers (the last ones); the others are the persona's rows


@dataclass
class TrainResult:
    model: Any  # the PEFT model holding the kept weights (best checkpoint by val loss unless keep_last)
    is_main: bool  # False on the other ranks of `accelerate launch`: only the main process writes
    results: TrainResults | None  # None on the other ranks: the held-out figures are computed once, on the main process


def prepare(rows: list[Row], loaded: LoadedBase, system: str, config: TrainConfig, with_replay: bool = True) -> Prepared:
    """Seeded held-out split, every row encoded (and template-checked) within max_length, LoRA targets resolved;
    with `with_replay`, the base's replay rows (config.replay_fraction) are generated and appended to the train rows."""
    from .loading import resolve_target_modules
    from .replay import make_replay_rows
    from .template import require_chat_template

    require_chat_template(loaded.tokenizer)
    train_rows, val_rows = split_rows(rows, config.val_fraction, config.seed)
    split = encode_split(loaded.tokenizer, train_rows, val_rows, system, config.max_length)
    replay = []
    if with_replay and config.replay_fraction > 0:
        # Only training prompts: the held-out rows stay unseen, so val loss and perplexity still measure the persona.
        replay_rows = make_replay_rows(loaded.model, loaded.tokenizer, train_rows, system, config.replay_fraction, config.seed)
        replay = encode_split(loaded.tokenizer, replay_rows, [], system, config.max_length).train if replay_rows else []
        split.train += replay
    targets = resolve_target_modules(loaded.model, config.target_modules)
    tokens = sum(len(e.input_ids) for e in split.train)
    supervised = sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in split.train)
    return Prepared(split, targets, tokens, supervised, len(replay))


def train_persona(job: TrainJob, model: ModelOptions, config: TrainConfig, log: Callable[[str], None] = print) -> PersonaMeta | None:
    """Train `job.persona` and publish its adapter folder; None for a dry run (which only logs what it would train)."""
    from .data import read_jsonl, sha256_file
    from .replay import replay_count
    from .template import show_example
    from .versions import library_versions

    if job.final_dir.exists() and not job.overwrite and not job.dry_run:
        raise UserError(f"{job.final_dir} already exists; pass --overwrite to replace it or choose another --persona")
    if job.resume and not job.work_dir.is_dir():
        raise UserError(f"nothing to resume: {job.work_dir} has no interrupted run of persona {job.persona}; start without --resume")
    system = job.system or DEFAULT_SYSTEM.format(persona=job.persona)
    rows = read_jsonl(job.data)
    loaded = model.load(training=True)
    prepared = prepare(rows, loaded, system, config, with_replay=not job.dry_run)
    split = prepared.split
    persona_rows = len(split.train) - prepared.replay_rows
    log(f"data: {len(rows)} rows ({persona_rows} train, {len(split.val)} val, {split.dropped_too_long} too long), "
        f"{prepared.train_tokens} train tokens of which {prepared.supervised_tokens} supervised; template check passed on every row")
    if config.replay_fraction > 0:
        log(f"replay: {prepared.replay_rows} rows of the base's own greedy answers to training prompts" if not job.dry_run else
            f"replay: up to {replay_count(persona_rows, config.replay_fraction)} rows of the base's answers, generated when training starts")
    log(f"lora: r={config.lora_r} alpha={config.lora_alpha} on {', '.join(prepared.targets)}")
    if job.dry_run:
        log("example (supervised part between [[ ]]):\n" + show_example(loaded.tokenizer, split.train[0]))
        return None

    result = run_training(config, loaded, split, prepared.targets, job.work_dir, resume=job.resume)
    if not result.is_main:
        return None  # under `accelerate launch`, only the main process writes the adapter
    world = world_size()
    meta = PersonaMeta(
        persona=job.persona,
        system=system,
        base=BaseRecord(loaded.ref.base_id, loaded.fingerprint),
        data=DataRecord(
            path=str(Path(job.data)), sha256=sha256_file(job.data), rows=len(rows),
            train_rows=persona_rows, val_rows=len(split.val), dropped_too_long=split.dropped_too_long,
            train_tokens=prepared.train_tokens, supervised_tokens=prepared.supervised_tokens, replay_rows=prepared.replay_rows,
        ),
        # every resolved flag but the ones that only steer this invocation
        hyperparameters={"persona": job.persona, "data": job.data, "system": job.system, "output_root": job.output_root,
                         **asdict(model), **asdict(config)},
        target_modules=prepared.targets,
        seed=config.seed,
        device=loaded.device,
        quantized_4bit=loaded.quantized,
        cpu_precision=loaded.cpu_precision.as_dict() if loaded.cpu_precision else None,
        versions=library_versions(),
        results=result.results,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        world_size=world,
        effective_batch_size=config.batch_size * config.grad_accum * world,
    )
    save_adapter(result.model, loaded.tokenizer, meta, job.final_dir, job.work_dir, job.overwrite)
    return meta


def run_training(
    config: TrainConfig, loaded: LoadedBase, split: EncodedSplit, targets: list[str], work_dir: Path,
    *, resume: bool = False, callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Run SFT with TRL on pre-rendered rows; checkpoints go to `work_dir`, `resume` continues from its last one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig

    from .perplexity import loss_standard_error, mean_loss, perplexity, reply_nll
    from .sft import EvaluateAtEnd, PersonaSFTTrainer
    from .training import cpu_bf16_training, latest_checkpoint, to_dataset

    resume_from = latest_checkpoint(work_dir) if resume else None
    if resume and resume_from is None:
        raise UserError(f"{work_dir} holds no checkpoint to resume from; start again without --resume")
    started = time.time()
    pad_id = loaded.tokenizer.pad_token_id
    model = loaded.model
    cuda = loaded.device == "cuda"
    # On CPU, bf16 autocast where --cpu-dtype resolved to bf16, the frozen base weights stored in bf16
    # for the run (training.cpu_bf16_training); LoRA weights, gradients and AdamW state stay fp32.
    cpu_bf16 = not cuda and loaded.cpu_precision is not None and loaded.cpu_precision.dtype == "bf16"
    if cuda:
        # PEFT's prepare_model_for_kbit_training would upcast every unquantized weight to fp32:
        # for Qwen's 152k-token embedding and untied head that is 2.5 GB instead of 1.2 GB in bf16.
        # Checkpointing only needs gradients to flow from the (frozen) embedding output.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)

    # Under `accelerate launch` each process takes its own share of every epoch's rows.
    steps_per_epoch = math.ceil(len(split.train) / (config.batch_size * config.grad_accum * world_size()))
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    has_val = bool(split.val)
    max_steps = config.max_steps
    if max_steps <= 0 and has_val and total_steps < config.min_steps:
        # Small data: more epochs, guarded by the held-out split (early stopping, best checkpoint kept).
        total_steps = max_steps = config.min_steps
    eval_steps = config.eval_steps or auto_eval_steps(total_steps)
    sft_config = SFTConfig(
        output_dir=str(work_dir),
        num_train_epochs=config.epochs,
        max_steps=max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(total_steps * config.warmup_ratio),
        weight_decay=config.weight_decay,
        seed=config.seed,
        data_seed=config.seed,
        bf16=cpu_bf16 or (cuda and loaded.dtype == torch.bfloat16),
        fp16=cuda and loaded.dtype == torch.float16,
        # Checkpointing trades compute for memory: needed to fit 8 GB cards, pure loss on CPU.
        activation_checkpointing=cuda,
        dataloader_pin_memory=cuda,
        optim="paged_adamw_8bit" if loaded.quantized else "adamw_torch",
        # On CPU: without it the Trainer sees no process group and every launched process trains alone,
        # and transformers refuses bf16 without a bf16 GPU.
        use_cpu=not cuda,
        max_length=None,
        pad_to_multiple_of=8,
        logging_steps=max(1, min(10, eval_steps)),
        eval_strategy="steps" if has_val else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=has_val and not config.keep_last,
        metric_for_best_model="eval_loss" if has_val else None,
        greater_is_better=False if has_val else None,
        report_to="none",
        disable_tqdm=False,  # the progress bar stays even though library logging is quieted
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    processes = sft_config.distributed_state  # built by the config: one process, or all those launched
    with model.disable_adapter():
        base_ppl = perplexity(model, split.val, pad_id) if processes.is_main_process else None
    processes.wait_for_everyone()
    all_callbacks = [EvaluateAtEnd()] if has_val else []
    if has_val and config.early_stopping_patience > 0:
        all_callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    trainer = PersonaSFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=to_dataset(split.train),
        eval_dataset=to_dataset(split.val) if has_val else None,
        processing_class=loaded.tokenizer,
        callbacks=[*all_callbacks, *callbacks],
    )
    with cpu_bf16_training(model) if cpu_bf16 else contextlib.nullcontext():
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if not trainer.is_world_process_zero():
        return TrainResult(trainer.model, False, None)
    state = trainer.state
    if cpu_bf16:
        # accelerate wrapped forward in autocast for training; the held-out figures are computed
        # in fp32 like the base's above, so that the two compare.
        trainer.model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    tuned_nll = reply_nll(trainer.model, split.val, pad_id)
    tuned_ppl = math.exp(mean_loss(tuned_nll)) if tuned_nll else None
    results = TrainResults(
        steps=state.global_step,
        epochs_run=state.epoch,
        trained_tokens=int(sum(len(e.input_ids) for e in split.train) * state.epoch),
        train_loss=output.training_loss,
        # The kept weights' own loss on the held-out replies (token-weighted), whichever checkpoint they are.
        val_loss=math.log(tuned_ppl) if tuned_ppl else None,
        val_loss_standard_error=loss_standard_error(tuned_nll),
        val_loss_history=[h["eval_loss"] for h in state.log_history if "eval_loss" in h],
        best_checkpoint=Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        base_val_ppl=base_ppl,
        tuned_val_ppl=tuned_ppl,
        train_seconds=round(time.time() - started, 1),
        steps_per_epoch=steps_per_epoch,
    )
    return TrainResult(trainer.model, True, results)


def auto_eval_steps(total_steps: int, evaluations: int = 6) -> int:
    """About `evaluations` evenly spaced evaluations, landing on the final step when a near divisor allows.

    (EvaluateAtEnd adds a final evaluation otherwise, so the last weights can always win.)
    """
    target = max(1, round(total_steps / evaluations))
    steps = target
    while total_steps % steps and steps < 2 * target:
        steps += 1
    return steps if total_steps % steps == 0 else target


def save_adapter(model: Any, tokenizer: Any, meta: PersonaMeta, final_dir: Path, work_dir: Path, overwrite: bool) -> None:
    """Write adapter, tokenizer and persona.json into a staging folder beside the final one, then rename it into place."""
    from .files import publish_folder

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.staging-", dir=final_dir.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        (staging / PERSONA_FILE).write_text(meta.to_json(), encoding="utf-8")
        publish_folder(staging, final_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(work_dir, ignore_errors=True)
