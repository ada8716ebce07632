"""Hostile inputs to sift-train, sift-export and sift-bench: each bad input ends in one line on
stderr naming the problem, exit code 2, no traceback, and nothing written or changed on disk.

The cases run in-process (each script's `main(argv)`), so the table costs seconds. sift-prep has
its own table (tests/unit/test_prep_hostile.py); inputs that need a live process group or a
trained checkpoint (bad shards, damaged or unfit checkpoints, busy directories) are end-to-end
tests in tests/e2e/test_preflight.py and tests/e2e/test_export_safety.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# ---- the workspace every case may name: written once, compared before and after each case

DS_OK = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
         "zero_optimization": {"stage": 0}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_corpus) -> Path:
    w = tmp_path_factory.mktemp("hostile")
    (w / "data").symlink_to(tiny_corpus)  # a real prepared corpus, never written to
    (w / "bad.toml").write_text("[optim\nlr = 1\n")
    (w / "latin1.toml").write_bytes("[run]\nseed = 1 # caf\xe9\n".encode("latin-1"))
    (w / "list.toml").write_text("optim = [1, 2]\n")
    (w / "empty_dir").mkdir()
    ds = {"ok": DS_OK,
          "both": {**DS_OK, "bf16": {"enabled": True}, "fp16": {"enabled": True}},
          "stage5": {**DS_OK, "zero_optimization": {"stage": 5}},
          "stage_str": {**DS_OK, "zero_optimization": {"stage": "two"}},
          "bf16_bool": {**DS_OK, "bf16": True},
          "bf16_yes": {**DS_OK, "bf16": {"enabled": "yes"}},
          "clip_str": {**DS_OK, "gradient_clipping": "x"},
          "optimizer": {**DS_OK, "optimizer": {"type": "Adam"}},
          "scheduler": {**DS_OK, "scheduler": {"type": "WarmupLR"}},
          "mismatch": {**DS_OK, "train_batch_size": 999},
          "no_batch": {"zero_optimization": {"stage": 0}},
          "neg_micro": {**DS_OK, "train_micro_batch_size_per_gpu": -4},
          "micro_huge": {**DS_OK, "train_micro_batch_size_per_gpu": 10**9},
          "total_huge": {"train_batch_size": 10**12, "zero_optimization": {"stage": 0}},
          "accumulation_huge": {**DS_OK, "gradient_accumulation_steps": 10**9},
          "less_than_a_row": {"train_batch_size": 4, "gradient_accumulation_steps": 8,
                              "zero_optimization": {"stage": 0}},
          "offload": {**DS_OK, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
          "fp16": {**DS_OK, "fp16": {"enabled": True}},
          "list": [1, 2, 3]}
    for name, body in ds.items():
        (w / f"ds_{name}.json").write_text(json.dumps(body))
    (w / "ds_notjson.json").write_text("{oops")
    (w / "ds_latin1.json").write_bytes(b'{"x": "\xe9"}')
    ckpt = w / "ckpt_bad_latest"
    ckpt.mkdir()
    (ckpt / "latest").write_text("step_00000042\n")
    broken = w / "ckpt_bad_state" / "step_00000001"
    broken.mkdir(parents=True)
    (broken / "sift_state.json").write_text("{not json")
    (w / "ckpt_bad_state" / "latest").write_text("step_00000001\n")
    (w / "a_file").write_text("x")
    (w / "ckpt_binary_latest").mkdir()
    (w / "ckpt_binary_latest" / "latest").write_bytes(b"\xff\xfe\x00")
    for name, state, sums in (("ckpt_state_list", "[]", None),
                              ("ckpt_state_no_world", "{}", None),
                              ("ckpt_sums_list", json.dumps({"world_size": 1}), '{"files": []}'),
                              ("ckpt_no_tokenizer", json.dumps({"world_size": 1}), None),
                              ("ckpt_foreign_state", json.dumps({"world_size": 1, "model": {},
                                                                 "config": {"model": {"bogus": 1}}}), None)):
        tag = w / name / "step_00000001"
        tag.mkdir(parents=True)
        (tag / "sift_state.json").write_text(state)
        if sums is not None:
            (tag / "checksums.json").write_text(sums)
        (w / name / "latest").write_text("step_00000001\n")
    (w / "ckpt_foreign_state" / "tokenizer").mkdir()
    (w / "one_class.csv").write_text("text,label\n" + "".join(f"review {i},pos\n" for i in range(20)))
    (w / "busy_export").mkdir()
    (w / "busy_export" / "notes.txt").write_text("mine")
    # mixture sources that do not fit the tiny corpus: another tokenizer, another seq_len
    from tests.prepared import run_prep

    text = w / "src" / "text.txt"
    text.parent.mkdir()
    text.write_text("\n\n".join(f"Document {i} holds a few words about the union, number {i}."
                                  for i in range(400)))
    run_prep([text], w / "other_tokenizer", "--vocab-size", "300", "--seq-len", "64",
             "--doc-boundary", "blank-line", "--no-progress")
    run_prep([text], w / "short_rows", "--tokenizer", str(tiny_corpus / "tokenizer"),
             "--seq-len", "32", "--doc-boundary", "blank-line", "--no-progress")
    damaged_data(w, tiny_corpus)
    small = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128}
    for name, body in (("cfg_gpt2", {**small, "model_type": "gpt2"}), ("cfg_heads", {**small, "hidden_size": 65}),
                       ("cfg_act", {**small, "hidden_act": "bogus"}),
                       ("cfg_layers", {**small, "num_hidden_layers": 10**6}),
                       ("cfg_wide", {**small, "hidden_size": 10**6, "num_attention_heads": 1})):
        (w / f"{name}.json").write_text(json.dumps(body))
    for name, model_type in (("ref_gpt2", "gpt2"), ("ref_no_weights", "bert")):
        (w / name).mkdir()
        (w / name / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 600}))
    (w / "ref_gpt2" / "model.safetensors").write_bytes(b"x")
    (w / "lock_list" / ".lock").parent.mkdir()
    (w / "lock_list" / ".lock").write_text("[1, 2]")
    return w


def damaged_data(w: Path, good: Path) -> None:
    """Copies of a prepared directory, each damaged in one way (a hand-edited manifest.json, a
    shard of another dtype)."""
    import shutil

    import numpy as np

    def copy(name: str, edit=None) -> Path:
        d = w / name
        shutil.copytree(good, d)
        if edit is not None:
            m = json.loads((d / "manifest.json").read_text())
            (d / "manifest.json").write_text(json.dumps(edit(m)))
        return d

    copy("m_list", lambda m: [m])
    copy("m_no_fingerprint", lambda m: {k: v for k, v in m.items() if k != "tokenizer_fingerprint"})
    copy("m_seq_len_str", lambda m: {**m, "seq_len": "abc"})
    copy("m_no_mask", lambda m: {**m, "special_tokens": {k: v for k, v in m["special_tokens"].items()
                                                         if k != "mask"}})
    copy("m_vocab_10", lambda m: {**m, "vocab_size": 10})
    copy("m_row_sources", lambda m: {**m, "splits": {**m["splits"], "train": {
        **m["splits"]["train"], "row_sources": [{"name": "a", "rows": 5}]}}})
    next((copy("empty_shard") / "train").glob("shard_*.npy")).write_bytes(b"")
    shard = next((copy("float_shard") / "train").glob("shard_*.npy"))
    rows = np.load(shard)
    shard.unlink()
    np.save(shard, rows.astype(np.float64))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and "data" not in p.parts[len(root.parts):][:1]}


def run_main(program: str, argv: list[str]) -> int:
    if program == "sift-train":
        from pipeline.train import main
    elif program == "sift-export":
        from pipeline.export_cli import main
    else:
        from benchmarks.sift_bench.cli import main
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's exit (usage errors)
        return int(exc.code or 0)


T = "sift-train"
D = "--set data.data_dir={ws}/data"
TRAIN = [
    # (extra argv, expected words)
    ("", "data.data_dir is required"),
    (D + " foo.bar=1", "unknown section [foo]"),
    (D + " optim.lrr=1", "unknown key 'optim.lrr'"),
    (D + " optim.lr=-1", "optim.lr must be > 0"),
    (D + " optim.lr=abc", "optim.lr: expected a number"),
    (D + " optim.lr=nan", "optim.lr must be > 0"),
    (D + " optim.lr=inf", "optim.lr must be > 0"),
    (D + " optim.lr=true", "optim.lr: expected a number"),
    (D + " optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    (D + " optim.warmup_steps=1.5", "optim.warmup_steps: expected an integer"),
    (D + " optim.decay=exp", "optim.decay must be linear, cosine or constant"),
    (D + " optim.betas=[0.9]", "optim.betas: expected 2 values"),
    (D + " optim.betas=[0.9,1.5]", "optim.betas must be two numbers in [0, 1)"),
    (D + " optim.eps=0", "optim.eps must be > 0"),
    (D + " optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    (D + " optim.decay_steps=0", "optim.decay_steps must be > 0"),
    (D + " optim.decay_steps=10 optim.decay_time_s=5", "both set"),
    (D + " optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    (D + " optim.max_nonfinite_in_row=0", "optim.max_nonfinite_in_row must be >= 1"),
    (D + " masking.rate=0", "masking.rate must be in (0, 1)"),
    (D + " masking.rate=1.5", "masking.rate must be in (0, 1)"),
    (D + " masking.mask_prob=0.9 masking.random_prob=0.2", "sum to <= 1"),
    (D + " masking.whole_word=yes", "masking.whole_word: expected true or false"),
    (D + " model.preset=bert-huge", "model.preset must be one of"),
    (D + " model.exit_layer=0", "model.exit_layer must be an int >= 1"),
    (D + " model.exit_head=both", "model.exit_head must be one of"),
    (D + " model.hidden_dropout=1.0", "model.hidden_dropout must be in [0, 1)"),
    (D + " model.attention_dropout=-0.1", "model.attention_dropout must be in [0, 1)"),
    (D + " model.exit_loss_weight=-1", "model.exit_loss_weight must be finite and >= 0"),
    (D + " model.init_from=some/dir model.preset=bert-base", "unset model.preset"),
    (D + " model.init_from=some/dir model.max_positions=512", "unset model.max_positions"),
    (D + " model.max_positions=0", "model.max_positions must be an int in [1, 65536]"),
    # a fresh hostile pass (issue 24's target): values that allocated without bound, never
    # finished a step, failed inside DeepSpeed with a traceback, or trained where they should not
    (D + " model.max_positions=100000000", "model.max_positions must be an int in [1, 65536]"),
    (D + " selection.temperature=inf", "selection.temperature must be > 0 and finite"),
    (D + " selection.draw=sample selection.temperature=1e-300", "selection.temperature must be at least 1e-06"),
    (D + " optim.decay_time_s=inf", "optim.decay_time_s must be > 0 and finite"),
    (D + " eval.every_s=inf", "eval.every_s must be > 0 and finite"),
    (D + ' checkpoint.dir=""', "checkpoint.dir must not be empty"),
    (D + " run.ds_config={ws}/ds_micro_huge.json", "a micro batch of 1000000000 rows a rank is more than 65536"),
    (D + " run.ds_config={ws}/ds_total_huge.json", "a micro batch of 1000000000000 rows a rank is more than 65536"),
    (D + " run.ds_config={ws}/ds_accumulation_huge.json", "1000000000 accumulation steps are more than 65536"),
    (D + " run.ds_config={ws}/ds_less_than_a_row.json", "train_batch_size 4 is less than one row a rank"),
    (D + " run.ds_config={ws}/ds_offload.json", "offload_optimizer needs DeepSpeed's own CPU optimizer"),
    (D + " run.ds_config={ws}/ds_fp16.json", "fp16 is enabled, but the cpu accelerator does not support it"),
    (D + " run.output_dir={ws}/data", "run.output_dir {ws}/data is the data directory"),
    (D + " run.output_dir={ws}/data/run", "lies inside the data directory"),
    (D + " checkpoint.dir={ws}/data", "checkpoint.dir {ws}/data is the data directory"),
    (D + " checkpoint.dir={ws}", "holds the data directory"),
    (D + " checkpoint.dir={ws}/busy_export", "holds files that are not checkpoints (notes.txt)"),
    (D + " model.init_from=x checkpoint.init_from=y", "not both"),
    (D + " selection.policy=bogus", "selection.policy"),
    (D + " selection.fraction=0", "selection.fraction"),
    (D + " selection.fraction=1.5", "selection.fraction"),
    (D + " selection.scope=bogus", "selection.scope"),
    (D + " budget.steps=0", "budget.steps"),
    (D + " eval.batch_size=0", "eval.batch_size must be >= 1"),
    (D + " eval.every_steps=-1", "eval.every_steps must be >= 0"),
    (D + " eval.max_samples=0", "eval.max_samples must be >= 1"),
    (D + " checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0"),
    (D + " checkpoint.keep_last=-1", "checkpoint.keep_last must be >= 0"),
    (D + " checkpoint.verify=md5", "checkpoint.verify must be sample or sha256"),
    (D + " logging.every_steps=0", "logging.every_steps must be >= 1"),
    (D + " run.seed=-1", "run.seed must be in [0, 2**63)"),
    (D + " run.dist_timeout_s=0", "run.dist_timeout_s must be > 0"),
    (D + ' run.output_dir=""', "run.output_dir must not be empty"),
    (D + " data.verify=full", "data.verify must be size or sha256"),
    (D + " data.prefetch=-1", "data.prefetch must be in [0, 64]"),
    (D + " data.prefetch=1000000000", "data.prefetch must be in [0, 64]"),
    (D + " selection.history_size=4000000000000", "selection.history_size must be an int in [1, 268435456]"),
    (D + " selection.history_visits=0", "selection.history_visits must be an int in [1, 1048576]"),
    (D + " selection.pool=expand selection.fraction=0.000001", "loads and scores more than 256 candidates per trained row"),
    (D + " optim.decay=linear budget.steps=none budget.samples=1000", "optim.decay needs a horizon"),
    (D + " budget.steps=none", "budget: set at least one of"),
    ('--set data.sources=["{ws}/data"] data.data_dir={ws}/data', "set data.data_dir or data.sources, not both"),
    ('--set data.sources=["{ws}/data","{ws}/data/"]', "listed twice in data.sources"),
    ('--set data.sources=["{ws}/data","{ws}/missing"]', "no manifest.json"),
    ('--set data.sources=["{ws}/data","{ws}/empty_dir"]', "no manifest.json"),
    ('--set data.sources=["{ws}/data","{ws}/a_file"]', "no manifest.json"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"]', "prepared with another tokenizer than source"),
    ('--set data.sources=["{ws}/data","{ws}/short_rows"]', "sequence length 32, source 'data' has 64"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1]', "data.weights has 1 entries, data.sources 2"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1,-1]', "data.weights must be positive and finite"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1,0]', "data.weights must be positive and finite"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1,nan]', "data.weights must be positive and finite"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1,inf]', "data.weights must be positive and finite"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=["a",1]', "data.weights[0]: expected a number"),
    (D + " data.weights=[1]", "data.weights needs data.sources"),
    ('--set data.sources=["{ws}/data","{ws}/other_tokenizer"] data.weights=[1e308,1e308]',
     "data.weights must be positive and finite"),  # their sum is not
    ('--set data.sources=[""]', "data.sources: an entry is empty"),
    ("--set data.sources={ws}/data", "data.sources: expected a list"),
    ("--set data.sources=[1,2]", "data.sources[0]: expected a string"),
    ("--set data.sources=[]", "data.data_dir is required"),
    # NaN and inf that comparisons let through (a hostile pass of issue 24)
    (D + " masking.mask_prob=nan", "masking.mask_prob and masking.random_prob must be >= 0 and sum to <= 1"),
    (D + " masking.random_prob=nan", "masking.mask_prob and masking.random_prob must be >= 0 and sum to <= 1"),
    (D + " optim.weight_decay=inf", "optim.weight_decay must be >= 0 and finite"),
    (D + " optim.eps=inf", "optim.eps must be > 0 and finite"),
    (D + " budget.steps=none budget.wall_time_s=inf", "budget.wall_time_s must be > 0 and finite"),
    (D + " run.dist_timeout_s=inf", "run.dist_timeout_s must be > 0 and at most 1e9 seconds"),
    (D + " run.dist_timeout_s=1e300", "run.dist_timeout_s must be > 0 and at most 1e9 seconds"),
    (D + " selection.history_rescore_every=0", "selection.history_rescore_every must be an int in [1, 1024]"),
    (D + " selection.history_rescore_every=1.5", "selection.history_rescore_every: expected an integer"),
    (D + ' selection.policy=sift-loss selection.history_rescore_every=3', "needs selection.history = 'mean'"),
    (D + " selection.percentile_window=-1", "selection.percentile_window must be an int in [0, 1048576]"),
    (D + " selection.percentile_window=2000000", "selection.percentile_window must be an int in [0, 1048576]"),
    # hand-edited or damaged manifests and shards (a hostile pass of issue 24)
    ("--set data.data_dir={ws}/m_list", "not a sift-prep manifest (a JSON list)"),
    ("--set data.data_dir={ws}/m_no_fingerprint", "'tokenizer_fingerprint' is missing"),
    ("--set data.data_dir={ws}/m_seq_len_str", "'seq_len' is 'abc', not an integer"),
    ("--set data.data_dir={ws}/m_no_mask", "special token 'mask' is None"),
    ("--set data.data_dir={ws}/m_vocab_10", "vocab_size 10, but its tokenizer has 600 ids"),
    ("--set data.data_dir={ws}/m_row_sources", "row_sources of split 'train' cover 5 rows"),
    ("--set data.data_dir={ws}/float_shard", "of float64, manifest.json says"),
    ("--set data.data_dir={ws}/empty_shard", "truncated or not a shard (No data left in file)"),
    (D + " model.preset=none model.config_file={ws}/cfg_gpt2.json", "is not a BertConfig (model_type 'gpt2')"),
    (D + " model.preset=none model.config_file={ws}/cfg_heads.json",
     "hidden_size 65 is not a multiple of num_attention_heads 2"),
    (D + " model.preset=none model.config_file={ws}/cfg_act.json", "hidden_act 'bogus' is not an activation"),
    (D + " model.preset=none model.config_file={ws}/cfg_layers.json", "B parameters need"),  # was built
    (D + " model.preset=none model.config_file={ws}/cfg_wide.json", "B parameters need"),  # until OOM
    (D + " selection.normalize=reference selection.reference_model={ws}/ref_gpt2", "a gpt2 model, not BERT"),
    (D + " selection.normalize=reference selection.reference_model={ws}/ref_no_weights", "no weights"),
    (D + " --resume {ws}/ckpt_binary_latest", "holds no tag name (undecodable bytes"),
    (D + " --resume {ws}/ckpt_state_list", "sift_state.json holds a JSON list, not an object"),
    (D + " run.output_dir={ws}/lock_list", "a lock file that names no run (empty or damaged)"),
    ("--set optim.lr", "--set expects section.key=value"),
    ("--set a.b.c=1", "--set key must be section.key"),
    ("--set =1", "--set expects section.key=value"),
    ("--config {ws}/missing.toml", "config file not found"),
    ("--config {ws}/empty_dir", "config file not found"),
    ("--config {ws}/bad.toml", "not valid TOML"),
    ("--config {ws}/latin1.toml", "not UTF-8 text"),
    ("--config {ws}/list.toml " + D, "[optim] must be a table"),
    (D + " run.ds_config={ws}/missing.json", "DeepSpeed config not found"),
    (D + " run.ds_config={ws}/ds_both.json", "bf16 and fp16 are both enabled"),
    (D + " run.ds_config={ws}/ds_stage5.json", "zero_optimization.stage must be 0, 1, 2 or 3"),
    (D + " run.ds_config={ws}/ds_stage_str.json", "zero_optimization.stage must be 0, 1, 2 or 3"),
    (D + " run.ds_config={ws}/ds_bf16_bool.json", "'bf16' must be an object"),
    (D + " run.ds_config={ws}/ds_list.json", "must be a JSON object"),
    (D + " run.ds_config={ws}/ds_bf16_yes.json", "bf16.enabled must be true, false or \"auto\", got 'yes'"),
    (D + " run.ds_config={ws}/ds_clip_str.json", "gradient_clipping must be a number >= 0, got 'x'"),
    (D + " run.ds_config={ws}/ds_optimizer.json", "remove the 'optimizer' block"),
    (D + " run.ds_config={ws}/ds_scheduler.json", "remove the 'scheduler' block"),
    (D + " run.ds_config={ws}/ds_mismatch.json", "inconsistent batch sizes"),
    (D + " run.ds_config={ws}/ds_no_batch.json", "set train_micro_batch_size_per_gpu"),
    (D + " run.ds_config={ws}/ds_neg_micro.json", "must be a positive integer"),
    (D + " run.ds_config={ws}/ds_notjson.json", "not valid JSON"),
    (D + " run.ds_config={ws}/ds_latin1.json", "not valid JSON"),
    (D + " run.ds_config={ws}/empty_dir", "DeepSpeed config not found"),
    (D + " run.ds_config={ws}/ds_ok.json --deepspeed_config ds_configs/cpu_zero2_fp32.json",
     "name different DeepSpeed configs"),
    ("--bogus-flag", "unrecognized arguments: --bogus-flag"),
    ("--resume", "expected one argument"),
    ("--config", "expected one argument"),
]
EXPORT = [
    ("{ws}/missing {ws}/out", "no such checkpoint directory"),
    ("{ws}/empty_dir {ws}/out", "neither a checkpoint directory"),
    ("{ws}/a_file {ws}/out", "neither a checkpoint directory"),
    ("{ws}/ckpt_bad_latest {ws}/out", "is missing (checkpoint directory damaged)"),
    ("{ws}/ckpt_bad_state {ws}/out", "unreadable client state"),
    ("{ws}/ckpt_binary_latest {ws}/out", "holds no tag name (undecodable bytes"),
    ("{ws}/ckpt_state_list {ws}/out", "sift_state.json holds a JSON list, not an object"),
    ("{ws}/ckpt_state_no_world {ws}/out", "world_size None is not a number of ranks"),
    ("{ws}/ckpt_sums_list {ws}/out", "damaged file(s) checksums.json"),
    ("{ws}/ckpt_no_tokenizer {ws}/out", "no tokenizer/ beside the checkpoints"),
    ("{ws}/ckpt_foreign_state {ws}/out", "describes no model this version builds (TypeError"),
    ("{ws}/ckpt_bad_state {ws}/busy_export", "not empty (1 entries)"),
    # --overwrite replaced any directory whole (a hostile pass deleted a sift-prep output so)
    ("{ws}/ckpt_bad_state {ws}/busy_export --overwrite", "holds files that are not an exported model (notes.txt)"),
    ("{ws}/ckpt_bad_state {ws}/data/tokenizer --overwrite", "holds no exported model"),  # was replaced
    ("{ws}/ckpt_bad_state /proc/sift-export", "/proc/sift-export: cannot write the export there"),  # exit 1
    ("{ws}/ckpt_bad_state {ws}/" + "x" * 300, "cannot export there (File name too long)"),  # after loading
    ("{ws}/ckpt_bad_state {ws}/ckpt_bad_state/export", "inside (or holding) the checkpoint directory"),
    ("{ws}/ckpt_bad_state {ws}/a_file", "exists and is not a directory"),
    ("{ws}/ckpt_bad_state {ws}/a_file/out", "a_file is not a directory"),
    ("{ws}/missing", "the following arguments are required: out"),
    ("", "the following arguments are required: checkpoint, out"),
    ("{ws}/missing {ws}/out --verify md5", "invalid choice: 'md5'"),
    ("{ws}/missing {ws}/out --bogus", "unrecognized arguments: --bogus"),
]
B = "--data {ws}/data --no-hf-baseline --work-dir {ws}/bench_work --out {ws}/bench_out"
BENCH = [
    ("", "the following arguments are required: --data"),
    ("--data {ws}/missing", "no manifest.json"),
    ("--data {ws}/empty_dir", "no manifest.json"),
    (B + " --policies bogus", "bogus"),
    (B + " --fractions 0", "fraction"),
    (B + " --fractions 2", "fraction"),
    (B + " --fractions x", "invalid"),
    (B + " --pools bogus", "bogus"),
    (B + " --exit-layers 0", "exit"),
    (B + " --exit-heads bogus", "bogus"),
    (B + " --seeds x", "invalid"),
    (B + " --budget-s 0", "budget"),
    (B + " --budget-s -5", "budget"),
    (B + " --world-size 0", "world"),
    (B + " --warm-start 0", "--warm-start"),
    (B + " --warm-start {ws}/empty_dir", "--warm-start"),
    (B + " --warm-start {ws}/missing", "--warm-start"),
    (B + " --warm-start {ws}/ckpt_bad_latest", "is missing (checkpoint directory damaged)"),
    (B + " --recipe {ws}/missing.toml", "config file not found"),
    (B + " --recipe {ws}/bad.toml", "not valid TOML"),
    (B + " --variant x optim.lrr=1", "unknown key 'optim.lrr'"),
    (B + " --set optim.lr=-1", "optim.lr must be > 0"),
    (B + " --target-fraction 1.5", "target"),
    (B + " --eval-interval-s 0", "eval"),
    (B + " --quick --exit-layers 3", "model.exit_layer must be in 1..2 for this model, got 3"),
    (B + " --budget-s inf", "--budget-s and --eval-interval-s must be > 0 and finite"),
    (B + " --budget-s 1e300", "--budget-s must be at most 2.592e+06 seconds"),  # ran "forever"
    (B + " --eval-interval-s inf", "--budget-s and --eval-interval-s must be > 0 and finite"),
    (B + " --timeout-s 0", "--timeout-s must be > 0"),
    (B + " --timeout-s nan", "--timeout-s must be > 0"),
    (B + " --seeds -1", "--seeds needs distinct integers in [0, 2**63)"),
    (B + " --name a/b", "--name must be a file name"),
    # a fresh hostile pass: the report's file names failed after every arm had run; the same arm
    # listed twice ran twice
    (B + " --name " + "n" * 300, "--name must be at most 200 bytes"),
    (B + " --fractions 0.5,0.5", "--fractions lists 0.5 more than once"),
    (B + " --world-size 1000", "--world-size 1000 is more ranks than this machine's"),  # started 1000
    # the downstream data was read only after every arm had trained
    (B + " --downstream {ws}/a_file", "--downstream: {ws}/a_file: unknown extension ''"),
    ("--data {ws}/data --no-hf-baseline --work-dir /proc/sift-bench", "--work-dir /proc/sift-bench: cannot write"),
    (B + " --downstream {ws}/one_class.csv", "one class ('pos'); classification needs at least two"),
    (B + " --downstream-seeds 1,2", "--downstream-seeds and --downstream-args need --downstream DATASET"),
    (B + " --downstream {ws}/one_class.csv --downstream-args=--epochs=-1", "epochs must be a finite number > 0"),
    (B + " --downstream {ws}/one_class.csv --downstream-args=--lr=nan", "lr must be a finite number > 0"),
    ("--data {ws}/data --no-hf-baseline --work-dir {ws}/data/bench", "/bench lies inside the data directory {ws}/data"),
    ("--data {ws}/data --no-hf-baseline --work-dir {ws}/w --out {ws}/data", "--out {ws}/data is the data directory"),
    (B + " --budget-s 5 --eval-interval-s 100", "--eval-interval-s 100 is not shorter than --budget-s 5"),
    (B + " --set checkpoint.dir={ws}/ckpt", "--set: checkpoint.dir is set by sift-bench for every arm"),
    (B + " --variant v data.data_dir={ws}/empty_dir", "--variant v: data.data_dir is set by sift-bench"),
    (B + " --variant v run.output_dir={ws}/x budget.steps=5", "--variant v: budget.steps, run.output_dir is set"),
    (B + " --policies ,", "--policies needs at least one value"),  # ran the default policies
    (B + " --policies sift-loss,random,sift-loss", "--policies lists sift-loss more than once"),
    (B + " --exit-layers 1,1", "--exit-layers lists 1 more than once"),
    (B + " --variant v optim.lr=1e-3 --variant v optim.lr=2e-3", "--variant tags must differ: ['v'] given twice"),
    (B + " --out {ws}/a_file", "a_file: exists and is not a directory"),
    (B + " --work-dir {ws}/a_file", "a_file: exists and is not a directory"),
    ("--data {ws}/m_list --no-hf-baseline", "m_list/manifest.json: not a sift-prep manifest"),
    ("--data {ws}/float_shard --no-hf-baseline", "of float64, manifest.json says"),
    (B + ' --downstream {ws}/a_file --downstream-args "--max-length', "No closing quotation"),
    (B + " --warm-start {ws}/ckpt_binary_latest", "holds no tag name"),
    (B + " --warm-start {ws}/ckpt_state_list", "unreadable client state"),
]
CASES = ([(T, *c) for c in TRAIN] + [("sift-export", *c) for c in EXPORT]
         + [("sift-bench", *c) for c in BENCH])


def test_the_table_is_large():
    assert len(CASES) >= 100 - 30  # with tests/unit/test_prep_hostile.py's table: well over 100


@pytest.mark.parametrize("program, argv, words", CASES,
                         ids=[f"{p}:{a[:60]}" for p, a, _ in CASES])
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(program, argv, words, ws, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(ws)  # a default output directory would land here: the snapshot sees it
    import benchmarks.sift_bench.cli as bench_cli

    def no_job(*args, **kwargs):  # a tripwire, not a stand-in: the input got past every check
        raise AssertionError("a benchmark job started: the bad input was not refused up front")

    monkeypatch.setattr(bench_cli, "run_job", no_job)
    refused_in_one_line(program, [a.replace("{ws}", str(ws)) for a in argv.split()] if argv else [],
                        words.replace("{ws}", str(ws)), ws, capsys)


def refused_in_one_line(program: str, argv: list[str], words: str, ws: Path, capsys) -> None:
    """`program argv` exits 2 with one line on stderr holding `words`, no traceback, and the
    workspace unchanged."""
    before = snapshot(ws)
    code = run_main(program, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"{program}: ") and words in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(ws) == before


def test_a_newline_in_a_path_stays_on_one_line(ws, capsys, monkeypatch):
    """A path that holds a newline is shown escaped: the error is still one line."""
    monkeypatch.chdir(ws)
    code = run_main("sift-train", ["--set", f"data.data_dir={ws}/no\nsuch"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no\\nsuch: no manifest.json" in err, err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path):
    """Ctrl-C in sift-export (anywhere: imports, loading, writing), and in sift-train before its
    run began (torch still importing): one line, exit 130, no traceback."""
    import subprocess
    import sys

    import pipeline.export_cli as export_cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_cli, "export", interrupted)
    assert export_cli.main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "sift-export: interrupted\n"
    code = ("import pipeline.train as t\n"
            "def main():\n    raise KeyboardInterrupt\n"
            "t.main = main\nt.cli()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert (proc.returncode, proc.stderr) == (130, "sift-train: interrupted\n")


def test_an_export_into_the_current_directory_is_refused(ws, tmp_path, capsys, monkeypatch):
    """OUT "" or "." is the current directory, which an export cannot replace whole."""
    from pipeline.export_cli import main

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in ("", "."):
        assert main([str(ws / "ckpt_bad_state"), out]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the current directory; export to a directory of its own" in err
    assert not any(here.iterdir())


def test_flag_values_reach_the_config_as_given():
    """--resume and --deepspeed_config become TOML overrides: a directory named 2024, a quote or a
    backslash in a path stay the string given (were an integer, or a path with quotes around it)."""
    from pipeline.config import parse_override
    from pipeline.train_args import overrides_from, parse_args

    args = parse_args(["--resume", "2024", "--deepspeed_config", 'ds "v2"\\x.json'])
    assert [parse_override(o)[1] for o in overrides_from(args)] == ["2024", 'ds "v2"\\x.json']


ENV_CASES = [  # a launcher's (or a user's) environment that cannot describe a process group
    ({"RANK": "5", "WORLD_SIZE": "2"}, "launch error: RANK=5, WORLD_SIZE=2, LOCAL_RANK=0: a rank must be in"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "launch error: RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "launch error: RANK=0, WORLD_SIZE=0"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "RANK and WORLD_SIZE are set but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     "MASTER_PORT='abc' is not a port number"),
    ({"SIFT_FAULTS": "bogus"}, "SIFT_FAULTS='bogus' is not JSON"),
    ({"SIFT_FAULTS": "[1]"}, "SIFT_FAULTS must be a JSON object, got list"),
    ({"SIFT_FAULTS": '{"kill_at_step": "a"}'}, "SIFT_FAULTS: kill_at_step must be an integer, got 'a'"),
]


@pytest.mark.parametrize("env, words", ENV_CASES, ids=[str(e) for e, _ in ENV_CASES])
def test_a_bad_launch_environment_is_one_line_exit_2(env, words, ws, capsys, monkeypatch):
    """A rank outside its world waited for peers until the timeout (10 minutes by default); RANK
    and WORLD_SIZE=2 without LOCAL_RANK ran as a world of one (DeepSpeed's MPI fallback); a
    damaged SIFT_FAULTS failed inside the trainer with a JSON traceback."""
    monkeypatch.chdir(ws)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SIFT_FAULTS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    refused_in_one_line("sift-train", ["--set", f"data.data_dir={ws}/data"], words, ws, capsys)
