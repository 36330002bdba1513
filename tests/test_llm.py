"""llm.py as a user runs it: contract folder, reload equality, resume, refusals, real learning."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm
from conftest import ROOT, head_rows
from personakit.errors import UserError

CONTRACT = {"adapter_model.safetensors", "adapter_config.json", "persona.json", "tokenizer.json",
            "tokenizer_config.json"}


def run(*argv: str) -> int:
    return llm.main(llm.parse_args(list(argv)))


@pytest.fixture()
def data(tmp_path) -> Path:
    return head_rows(ROOT / "data" / "en" / "girl.jsonl", 24, tmp_path / "girl.jsonl")


def test_adapter_folder_has_every_contract_file(tiny_adapters):
    folder = tiny_adapters / "girl"
    assert CONTRACT <= {p.name for p in folder.iterdir()}
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in folder.iterdir())
    meta = json.loads((folder / "persona.json").read_text())
    assert meta["persona"] == "girl" and meta["system"]
    assert len(meta["data"]["sha256"]) == 64 and meta["data"]["rows"] == 24
    assert meta["base"]["fingerprint"] and meta["seed"] == 42
    assert {"lora_r", "learning_rate", "max_length", "batch_size"} <= set(meta["hyperparameters"])
    assert {"torch", "transformers", "peft", "trl"} <= set(meta["versions"])
    assert meta["results"]["steps"] == 2
    # Only finished folders are visible: no staging or work folders are left beside it.
    assert sorted(p.name for p in tiny_adapters.iterdir()) == ["girl", "peixuan"]


def test_train_core_returns_a_typed_result_whose_model_reloads_with_the_same_logits(tiny_model_dir, data, tmp_path):
    from peft import PeftModel

    from personakit.data import read_jsonl
    from personakit.loading import load_base
    from personakit.options import TrainConfig
    from personakit.persona import TrainResults
    from personakit.train import TrainResult, prepare, run_training

    args = llm.parse_args(["--persona", "p", "--data", str(data), "--base", str(tiny_model_dir),
                           "--output-root", str(tmp_path / "a"), "--max-steps", "2", "--learning-rate", "1e-2",
                           "--val-fraction", "0"])
    config = TrainConfig.from_args(args)
    loaded = load_base(args.base)
    prepared = prepare(read_jsonl(args.data), loaded, "sys", config)
    split = prepared.split
    assert len(split.train) == 24 and not split.val and "q_proj" in prepared.targets
    result = run_training(config, loaded, split, prepared.targets, tmp_path / "work")
    assert isinstance(result, TrainResult) and isinstance(result.results, TrainResults) and result.is_main
    assert result.results.steps == 2 and result.results.trained_tokens > 0 and result.results.val_loss is None
    model = result.model
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([split.train[0].input_ids])
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    fresh = load_base(str(tiny_model_dir))
    with torch.no_grad():
        base_logits = fresh.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(fresh.model, str(tmp_path / "saved"))(input_ids=ids).logits
    assert torch.allclose(trained, reloaded, atol=1e-5)
    assert not torch.allclose(trained, base_logits, atol=1e-4)


def test_dry_run_shows_the_supervised_part_and_writes_nothing(tiny_model_dir, data, tmp_path, capsys):
    assert run("--persona", "p", "--data", str(data), "--base", str(tiny_model_dir),
               "--output-root", str(tmp_path / "a"), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "[[" in out and "<|im_end|>]]" in out
    assert "24 rows" in out and "q_proj" in out
    assert not (tmp_path / "a").exists()


def test_existing_adapter_is_not_overwritten(tiny_model_dir, tiny_adapters, data):
    before = (tiny_adapters / "girl" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        run("--persona", "girl", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tiny_adapters))
    assert (tiny_adapters / "girl" / "adapter_model.safetensors").read_bytes() == before


def test_resume_continues_an_interrupted_run(tiny_model_dir, data, tmp_path, monkeypatch, capsys):
    root = tmp_path / "a"
    common = ["--persona", "p", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(root),
              "--batch-size", "4", "--val-fraction", "0", "--eval-steps", "2"]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after its checkpoints were written, before publishing

    monkeypatch.setattr("personakit.train.save_adapter", crash)
    with pytest.raises(KeyboardInterrupt):
        run(*common, "--max-steps", "4")
    assert not (root / "p").exists()
    assert (root / ".p.work" / "checkpoint-4").is_dir()
    monkeypatch.undo()
    assert run(*common, "--max-steps", "6", "--resume") == 0
    meta = json.loads((root / "p" / "persona.json").read_text())
    assert meta["results"]["steps"] == 6
    assert not (root / ".p.work").exists()


def test_resume_without_an_interrupted_run_is_refused(tiny_model_dir, data, tmp_path):
    with pytest.raises(UserError, match="nothing to resume"):
        run("--persona", "p", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tmp_path), "--resume")


@pytest.mark.parametrize("case", ["missing", "empty", "invalid", "hub", "targets"])
def test_bad_input_is_one_clear_error(case, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    base = str(tiny_model_dir)
    extra: list[str] = []
    expected = {
        "missing": "does not exist",
        "empty": "has no rows",
        "invalid": r"line 2: 'output' must be a non-empty string; line 3: invalid JSON",
        "hub": "pass its local folder",
        "targets": "match no linear layer",
    }[case]
    if case != "missing":
        data.write_text("" if case == "empty" else '{"instruction": "a", "output": "b"}\n'
                        + ('{"instruction": "a", "output": ""}\n{oops\n' if case == "invalid" else ""))
    if case == "hub":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        base = "someone/not-downloaded-model"
    if case == "targets":
        extra = ["--target-modules", "c_attn"]
    with pytest.raises(UserError, match=expected):
        run("--persona", "p", "--data", str(data), "--base", base, "--output-root", str(tmp_path / "a"), *extra)


def test_cli_error_is_one_sentence_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "llm.py"), "--persona", "p", "--data", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: data file") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_embedded_training_lowers_heldout_perplexity(embedded_dir, tmp_path):
    data = head_rows(ROOT / "data" / "en" / "peixuan.jsonl", 60, tmp_path / "peixuan.jsonl")
    assert run("--persona", "peixuan", "--data", str(data), "--output-root", str(tmp_path / "a"),
               "--max-steps", "6", "--val-fraction", "0.34", "--learning-rate", "1e-3", "--eval-steps", "3") == 0
    results = json.loads((tmp_path / "a" / "peixuan" / "persona.json").read_text())["results"]
    assert results["tuned_val_ppl"] < results["base_val_ppl"]
    assert results["val_loss"] < math.log(results["base_val_ppl"])


# ---- persona.json: PersonaMeta is its one reader and writer --------------------------------

def test_persona_json_round_trips_through_persona_meta(tiny_adapters):
    from personakit.persona import SCHEMA_VERSION, PersonaMeta, read_adapter

    path = tiny_adapters / "girl" / "persona.json"
    meta = read_adapter(path.parent).meta
    assert meta.schema_version == SCHEMA_VERSION == json.loads(path.read_text())["schema_version"]
    assert PersonaMeta.from_json(meta.to_json()) == meta
    assert meta.to_json() == path.read_text(encoding="utf-8")  # the file is exactly what to_json writes
    assert (meta.val_fraction, meta.seed, meta.max_length) == (0.0, 42, 512)


def test_schema_0_persona_json_is_read_with_its_recorded_split(tiny_adapters):
    from personakit.data import read_jsonl
    from personakit.persona import PersonaMeta, read_adapter
    from personakit.training import split_rows

    raw = json.loads((tiny_adapters / "girl" / "persona.json").read_text())
    del raw["schema_version"]  # files written before the field existed
    raw["hyperparameters"].update(val_fraction=0.5, max_length=300)
    raw["seed"] = 7
    meta = PersonaMeta.from_json(json.dumps(raw))
    assert meta.schema_version == 0 and meta.base.id == read_adapter(tiny_adapters / "girl").base_id
    rows = read_jsonl(raw["data"]["path"])
    assert meta.heldout_split(rows) == split_rows(rows, 0.5, 7) and meta.max_length == 300


@pytest.mark.parametrize("damage, expected", [
    (lambda raw: raw["hyperparameters"].pop("val_fraction"), "KeyError: 'hyperparameters.val_fraction'"),
    (lambda raw: raw["results"].pop("steps"), "TypeError"),
    (lambda raw: raw.update(schema_version=99), "newer than this personakit reads"),
    (lambda raw: raw.update(seed="42"), "seed must be"),
])
def test_damaged_or_newer_persona_json_is_one_clear_error(tiny_adapters, tmp_path, damage, expected):
    import shutil

    from personakit.persona import read_adapter

    folder = shutil.copytree(tiny_adapters / "girl", tmp_path / "girl")
    raw = json.loads((folder / "persona.json").read_text())
    damage(raw)
    (folder / "persona.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"persona.json is damaged or from an unknown version .*retrain the persona") as exc:
        read_adapter(folder)
    assert expected in str(exc.value)
    (folder / "persona.json").write_text("{not json")
    with pytest.raises(UserError, match="JSONDecodeError"):
        read_adapter(folder)


def test_small_dataset_holds_out_rows_and_says_how_noisy_the_estimate_is(tiny_model_dir, tmp_path, capsys):
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 140, tmp_path / "girl.jsonl")
    assert run("--persona", "girl", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tmp_path / "a"),
               "--max-steps", "1", "--batch-size", "4") == 0
    meta = json.loads((tmp_path / "a" / "girl" / "persona.json").read_text())
    assert meta["data"]["val_rows"] >= 10 and meta["data"]["train_rows"] + meta["data"]["val_rows"] == 140
    results = meta["results"]
    assert results["tuned_val_ppl"] > 0 and results["base_val_ppl"] > 0 and results["val_loss_standard_error"] > 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert f"standard error over {meta['data']['val_rows']} held-out rows" in done and "held-out perplexity base" in done


def test_tiny_dataset_holds_out_nothing_and_says_why(tiny_model_dir, tmp_path, capsys):
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 40, tmp_path / "girl.jsonl")
    assert run("--persona", "girl", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tmp_path / "a"),
               "--max-steps", "1", "--batch-size", "4") == 0
    meta = json.loads((tmp_path / "a" / "girl" / "persona.json").read_text())
    assert meta["data"]["val_rows"] == 0 and meta["results"]["tuned_val_ppl"] is None
    done = capsys.readouterr().out.splitlines()[-1]
    assert "nothing held out: 40 rows, fewer than the 50 a validation split needs" in done


@pytest.mark.parametrize("rows,held_out", [(49, 0), (50, 10), (140, 14), (300, 30)])
def test_holdout_is_at_least_ten_rows_from_fifty_rows_on(rows, held_out):
    from personakit.training import no_holdout_reason, split_rows

    train, val = split_rows([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(rows)], 0.1, 42)
    assert len(val) == held_out and len(train) + len(val) == rows
    assert len(val) <= 0.2 * rows
    if not held_out:
        assert no_holdout_reason(rows, 0.1) == f"nothing held out: {rows} rows, fewer than the 50 a validation split needs"


def test_replay_rows_are_the_bases_own_greedy_answers_and_are_recorded(embedded_dir, tmp_path, capsys):
    from personakit.data import read_jsonl
    from personakit.generation import generate_replies
    from personakit.loading import load_base
    from personakit.replay import make_replay_rows, replay_decoding
    from personakit.template import build_messages

    data = head_rows(ROOT / "data" / "en" / "peixuan.jsonl", 20, tmp_path / "peixuan.jsonl")
    rows = read_jsonl(data)
    loaded = load_base(str(embedded_dir))
    replay = make_replay_rows(loaded.model, loaded.tokenizer, rows, "sys", 0.1, seed=42)
    assert len(replay) <= 2 and replay
    for row in replay:
        own = generate_replies(loaded.model, loaded.tokenizer, [build_messages(row, "sys")], replay_decoding(42))[0]
        assert row["output"] == own.text and row["instruction"] in {r["instruction"] for r in rows}

    assert run("--persona", "peixuan", "--data", str(data), "--output-root", str(tmp_path / "a"), "--system", "sys",
               "--max-steps", "1", "--replay-fraction", "0.1") == 0
    meta = json.loads((tmp_path / "a" / "peixuan" / "persona.json").read_text())
    assert meta["data"]["train_rows"] == 20 and meta["data"]["replay_rows"] == len(replay)
    assert meta["hyperparameters"]["replay_fraction"] == 0.1
    assert f"replay: {len(replay)} rows of the base's own greedy answers" in capsys.readouterr().out


def test_replay_fraction_outside_zero_to_one_is_refused(tiny_model_dir, data, tmp_path):
    with pytest.raises(UserError, match="--replay-fraction must be between 0 and 1"):
        run("--persona", "p", "--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tmp_path / "a"),
            "--replay-fraction", "1.5")


def test_small_dataset_with_a_holdout_trains_at_least_min_steps(tiny_model_dir, tmp_path):
    data = head_rows(ROOT / "data" / "en" / "girl.jsonl", 60, tmp_path / "girl.jsonl")  # 50 train rows: 7 steps an epoch
    common = ["--data", str(data), "--base", str(tiny_model_dir), "--output-root", str(tmp_path / "a"), "--batch-size", "8",
              "--early-stopping-patience", "0", "--epochs", "1"]
    assert run("--persona", "scaled", *common, "--min-steps", "10") == 0
    assert run("--persona", "plain", *common, "--min-steps", "0") == 0
    scaled = json.loads((tmp_path / "a" / "scaled" / "persona.json").read_text())
    plain = json.loads((tmp_path / "a" / "plain" / "persona.json").read_text())
    assert scaled["results"]["steps"] == 10 and scaled["hyperparameters"]["min_steps"] == 10
    assert plain["results"]["steps"] == plain["results"]["steps_per_epoch"] == 7
