"""The CPU precision probe: bf16 only where this machine measures it fast, cached per CPU and torch."""
from __future__ import annotations

import json
import math

import pytest
from transformers import TrainerCallback

from personakit import precision
from personakit.precision import Probe, cached_probe, decide


def probe(fp32: float, bf16: float) -> Probe:
    return Probe(cpu="Test CPU", torch="2.x", threads=2, fp32_gflops=fp32, bf16_gflops=bf16, method=precision.METHOD)


def test_bf16_chosen_where_it_measures_fast():
    # An AMX Xeon as the issue measured it: fp32 ~220, bf16 ~1000 GFLOP/s.
    p = decide("auto", lambda: probe(220.0, 1000.0))
    assert p.dtype == "bf16"
    assert "4.55x" in p.reason and "at least" in p.reason


def test_fp32_kept_where_bf16_is_slow_or_only_slightly_faster():
    # This project's AVX2 CPUs: fp32 ~180, bf16 ~0.9 GFLOP/s.
    assert decide("auto", lambda: probe(180.0, 0.9)).dtype == "fp32"
    assert decide("auto", lambda: probe(100.0, 140.0)).dtype == "fp32"  # 1.4x is under the 1.5x bar
    assert decide("auto", lambda: probe(100.0, 150.0)).dtype == "bf16"


def test_explicit_flag_overrides_and_never_measures():
    def boom():
        raise AssertionError("the probe must not run when the dtype is given")

    assert decide("fp32", boom).dtype == "fp32"
    assert decide("bf16", boom).dtype == "bf16"
    assert decide("bf16", boom).reason == "--cpu-dtype bf16"


def test_probe_is_cached_per_cpu_and_torch(tmp_path):
    calls = []

    def fake():
        calls.append(1)
        return probe(200.0, 800.0)

    first = cached_probe(tmp_path, fake)
    second = cached_probe(tmp_path, fake)
    assert first == second and len(calls) == 1
    cache = json.loads((tmp_path / precision.CACHE_FILE).read_text())
    (key,) = cache
    assert precision.cpu_model() in key and "torch" in key


def test_damaged_cache_is_measured_again(tmp_path):
    (tmp_path / precision.CACHE_FILE).write_text("{not json")
    assert cached_probe(tmp_path, lambda: probe(1.0, 2.0)).bf16_gflops == 2.0
    assert json.loads((tmp_path / precision.CACHE_FILE).read_text())


def test_real_probe_measures_both_precisions_quickly():
    import time

    start = time.perf_counter()
    p = precision.measure()
    assert time.perf_counter() - start < 1.5
    assert p.fp32_gflops > 0 and p.bf16_gflops > 0 and p.threads >= 1


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError):
        decide("fp16", lambda: probe(1, 1))


# ---- wired into the scripts ----------------------------------------------------------------

@pytest.fixture()
def rows(tmp_path):
    from conftest import ROOT, head_rows

    return head_rows(ROOT / "data" / "en" / "girl.jsonl", 24, tmp_path / "girl.jsonl")


def _train_cli(tiny_model_dir, rows, tmp_path, *extra):
    import llm

    root = tmp_path / "adapters"
    code = llm.main(llm.parse_args(["--persona", "p", "--data", str(rows), "--base", str(tiny_model_dir),
                                    "--output-root", str(root), "--max-steps", "2", "--batch-size", "4",
                                    "--val-fraction", "0", "--cache-dir", str(tmp_path / "cache"), *extra]))
    assert code == 0
    return json.loads((root / "p" / "persona.json").read_text())


def test_explicit_cpu_dtype_never_probes_and_is_recorded_in_persona_json(tiny_model_dir, rows, tmp_path, capsys):
    meta = _train_cli(tiny_model_dir, rows, tmp_path, "--cpu-dtype", "fp32")
    assert not (tmp_path / "cache" / precision.CACHE_FILE).exists()  # the probe never ran
    assert meta["cpu_precision"] == {"dtype": "fp32", "generation": "fp32", "requested": "fp32",
                                     "reason": "--cpu-dtype fp32", "probe": None}
    assert "cpu precision: training fp32, generation fp32 (--cpu-dtype fp32)" in capsys.readouterr().err


def test_auto_probes_once_and_records_the_measurement(tiny_model_dir, rows, tmp_path, capsys):
    meta = _train_cli(tiny_model_dir, rows, tmp_path)
    assert (tmp_path / "cache" / precision.CACHE_FILE).exists()
    rec = meta["cpu_precision"]
    assert rec["requested"] == "auto" and rec["dtype"] in ("fp32", "bf16") and rec["generation"] == "fp32"
    assert rec["probe"]["fp32_gflops"] > 0 and rec["probe"]["bf16_gflops"] > 0
    assert f"cpu precision: training {rec['dtype']}" in capsys.readouterr().err


def test_persona_json_without_the_field_still_reads(tiny_model_dir, rows, tmp_path):
    from personakit.persona import PersonaMeta

    meta = _train_cli(tiny_model_dir, rows, tmp_path, "--cpu-dtype", "fp32")
    del meta["cpu_precision"]
    assert PersonaMeta.from_json(json.dumps(meta)).cpu_precision is None


def test_bad_cpu_dtype_is_refused_by_the_cli(capsys):
    import llm

    with pytest.raises(SystemExit) as exc:
        llm.parse_args(["--persona", "p", "--data", "x", "--cpu-dtype", "fp16"])
    assert exc.value.code == 2 and "--cpu-dtype" in capsys.readouterr().err


# Largest gap allowed between the held-out loss after bf16 and fp32 training of the same rows, seed
# and steps: bf16 keeps 8 mantissa bits (relative error ~0.4% per product), and LoRA weights,
# gradients and AdamW state stay fp32, so the two runs may drift but only slightly.
VAL_LOSS_TOLERANCE = 0.05


class DtypesWhileTraining(TrainerCallback):
    """A forward hook keeping the output dtypes seen from the trainer's first step to its end."""

    def __init__(self):
        self.open, self.seen = False, set()

    def hook(self, module, inputs, output):
        if self.open:
            self.seen.add(output.dtype)

    def on_train_begin(self, args, state, control, **kwargs):
        self.open = True

    def on_train_end(self, args, state, control, **kwargs):
        self.open = False


def test_bf16_training_runs_in_bf16_matches_fp32_within_tolerance_and_gives_back_the_fp32_base(tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel

    import llm
    from conftest import ROOT, head_rows
    from personakit.data import read_jsonl
    from personakit.loading import load_base
    from personakit.options import TrainConfig
    from personakit.train import prepare, run_training

    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 60, tmp_path / "girl.jsonl")
    args = llm.parse_args(["--persona", "p", "--data", str(data), "--base", str(tiny_model_dir), "--max-steps", "4",
                           "--learning-rate", "1e-3", "--batch-size", "8", "--early-stopping-patience", "0"])
    config = TrainConfig.from_args(args)
    results = {}
    for dtype in ("fp32", "bf16"):
        loaded = load_base(args.base, cpu_dtype=dtype, cache_dir=tmp_path / "cache", training=True)
        assert next(loaded.model.parameters()).dtype == torch.float32
        weights = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
        attention = loaded.model.config._attn_implementation
        # The dtype the projections really computed in while the trainer ran (steps and evaluations).
        during = DtypesWhileTraining()
        hook = loaded.model.model.layers[0].self_attn.q_proj.register_forward_hook(during.hook)
        prepared = prepare(read_jsonl(data), loaded, "sys", config)
        result = run_training(config, loaded, prepared.split, prepared.targets, tmp_path / f"work-{dtype}", callbacks=[during])
        hook.remove()
        results[dtype] = result.results
        assert during.seen == ({torch.bfloat16} if dtype == "bf16" else {torch.float32})
        lora = [p for n, p in result.model.named_parameters() if "lora_" in n]
        assert lora and all(p.dtype == torch.float32 for p in lora)
        # The base is handed back exactly as loaded: fp32 weights bit for bit, the same attention code.
        base = result.model.get_base_model()
        assert base.config._attn_implementation == attention
        for name, p in base.named_parameters():
            if "lora_" not in name:
                original = weights[name.replace(".base_layer", "")]
                assert p.dtype == torch.float32 and torch.equal(p, original), name
        # The returned model runs in fp32 again (autocast removed), exactly as it reloads from disk.
        result.model.save_pretrained(tmp_path / f"saved-{dtype}")
        ids = torch.tensor([prepared.split.val[0].input_ids])
        with torch.no_grad():
            trained = result.model(input_ids=ids).logits
            fresh = load_base(args.base, cpu_dtype="fp32")
            reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / f"saved-{dtype}"))(input_ids=ids).logits
        assert trained.dtype == torch.float32 and torch.allclose(trained, reloaded, atol=1e-5)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32.steps == bf16.steps == 4
    assert fp32.base_val_ppl == bf16.base_val_ppl  # the base is scored in fp32 either way
    assert bf16.val_loss != fp32.val_loss  # really trained in another precision
    assert abs(bf16.val_loss - fp32.val_loss) <= VAL_LOSS_TOLERANCE, (fp32.val_loss, bf16.val_loss)
    assert bf16.val_loss < math.log(fp32.base_val_ppl)  # and it learned


def test_entry_measured_by_an_older_method_is_measured_again(tmp_path):
    old = Probe(cpu="Test CPU", torch="2.x", threads=2, fp32_gflops=3.5, bf16_gflops=191.0)  # no method recorded
    cached_probe(tmp_path, lambda: old)
    assert cached_probe(tmp_path, lambda: probe(200.0, 800.0)).fp32_gflops == 200.0
