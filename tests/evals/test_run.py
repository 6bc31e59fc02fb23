"""`python -m evals.run` end to end on a tiny workdir; local JSONL / Parquet items; a Hugging Face directory."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.eval import get_config
from evals import run as R
from inference.loading import checkpoint_kind, load_checkpoint
from tests.evals.stubs import Bigram, CharTokenizer, bigram_table, make_workdir
from tests.helpers import run_program


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("evals") / "run")


def test_demo_suite_in_process(workdir, tmp_path):
    config = get_config("demo")
    config.limit = 3
    config.output_dir = str(tmp_path / "out")
    results = R.run(config, workdir)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["suite"] == "demo" and saved["checkpoint_kind"] == "loom" and saved["step"] == 5
    assert list(saved["tasks"]) == ["ppl", "addition_mc", "copy_gen", "addition"]
    t = saved["tasks"]
    assert t["ppl"]["metrics"]["documents"] == 3 and t["ppl"]["metrics"]["perplexity"] > 1
    assert 0 < t["ppl"]["metrics"]["bits_per_byte"] < 20
    assert 0 <= t["addition_mc"]["metrics"]["acc"] <= 1 and t["addition_mc"]["metrics"]["num_examples"] == 3
    assert {"exact_match", "bleu", "rouge1", "rouge2", "rougeL"} <= set(t["copy_gen"]["metrics"])
    assert set(t["addition"]["metrics"]) >= {"verified", "exact_match"}
    assert t["addition"]["examples"][0]["prompt"].count("\n") == 3  # three shots, one per line
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| task | kind | metric | value |" in md and "| addition_mc | multiple_choice | acc |" in md
    lines = (tmp_path / "out" / "samples" / "addition_mc.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(json.loads(lines[0])["lls"]) == 4
    assert results["tasks"]["ppl"]["metrics"]["tokens"] == saved["tasks"]["ppl"]["metrics"]["tokens"]


def test_dtype_override(workdir):
    model, tok, info = load_checkpoint(workdir, dtype="bfloat16")
    assert model.config.dtype == "bfloat16" and info["model"]["dtype"] == "bfloat16"
    assert tok.vocab_size <= model.config.vocab_size


def test_cli_end_to_end_and_one_line_errors(workdir, tmp_path):
    out = tmp_path / "cli"
    proc = run_program("evals.run", "--config=configs/eval.py:demo", f"--checkpoint={workdir}", "--config.limit=2",
                       "--config.tasks.copy_gen.enabled=False", f"--config.output_dir={out}")
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert "copy_gen" not in json.loads((out / "results.json").read_text())["tasks"]
    assert "| ppl | perplexity | perplexity |" in proc.stdout
    for args, message in [
        (["--config.tasks.ppl.limt=2"], "limt"),  # misspelled key
        (["--config.tasks.ppl.kind=perplexityy"], "tasks.ppl.kind='perplexityy' is not valid"),
    ]:
        bad = run_program("evals.run", "--config=configs/eval.py:demo", f"--checkpoint={workdir}", *args,
                          check=False)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), bad.stderr[-2000:]
        assert message in lines[0]


# After "Q", " " is likely; after " ", "a" has log-prob -3 and "b" -1; after "b", "b" has -0.5: by total
# log-likelihood "a" beats "bbbbbbbb", per character "bbbbbbbb" wins.
PLANTED = {("Q", " "): -0.1, (" ", "a"): -3.0, (" ", "b"): -1.0, ("b", "b"): -0.5}
ITEMS = [{"query": "Q", "choices": ["a", "bbbbbbbb"], "gold": 1},
         {"query": "Q", "choices": ["a", "c"], "gold": 0},
         {"query": "Q", "choices": ["a", "bbbbbbbb"], "gold": 0}]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_multiple_choice_task_from_local_files(tmp_path, fmt):
    path = tmp_path / f"items.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    else:
        pq.write_table(pa.Table.from_pylist(ITEMS), path)
    config = get_config("arc")
    config.output_dir = str(tmp_path / "out")
    t = config.tasks.arc
    t.format, t.source.format, t.source.path = "plain", fmt, str(path)
    results = R.run(config, "planted", model=Bigram(bigram_table(PLANTED)), tokenizer=CharTokenizer())
    m = results["tasks"]["arc"]["metrics"]
    assert (m["acc"], m["acc_norm"], m["num_examples"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3), 3)


def test_config_errors_before_loading(tmp_path):
    config = get_config("mmlu")
    with pytest.raises(R.ConfigError, match="tasks.mmlu.source.path is empty"):
        R.run(config, tmp_path)
    config = get_config("demo")
    config.tasks.copy_gen.metrics = ("bleu", "meteor")
    with pytest.raises(R.ConfigError, match="meteor"):
        R.enabled_tasks(config)
    config = get_config("demo")
    config.tasks.addition.source.path = "division"
    with pytest.raises(R.ConfigError, match="tasks.addition.source.path='division' is not a synthetic task"):
        R.enabled_tasks(config)
    with pytest.raises(ValueError, match="unknown eval suite"):
        get_config("mmlu_pro")
    with pytest.raises(FileNotFoundError, match="neither a Loom workdir"):
        checkpoint_kind(tmp_path)


def test_hugging_face_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from models import hf
    from models import transformer as T
    from tests.helpers import tiny_model_config

    d = tmp_path / "hf"
    model = T.build(tiny_model_config(vocab_size=320), seed=1)
    hf.save(model, d)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["12+34=46", "copy(abc)=abc", "the quick brown fox"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    assert checkpoint_kind(d) == "hf"
    config = get_config("demo")
    config.limit = 2
    config.tasks.ppl.enabled = False
    config.output_dir = str(tmp_path / "out")
    results = R.run(config, d)
    assert results["checkpoint_kind"] == "hf" and set(results["tasks"]) == {"addition_mc", "copy_gen", "addition"}


def test_generation_task_from_jsonl_with_fewshot_file(tmp_path):
    from inference import generate
    from models import transformer as T
    from tests.helpers import tiny_model_config

    items = [{"question": "capital of France?", "answers": ["Paris", "paris"]},
             {"question": "2+2?", "answers": ["4"]}]
    shots = [items[0], {"question": "colour of grass?", "answers": ["green"]}, {"question": "1+1?", "answers": ["2"]}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shots))
    config = get_config("generation")
    config.output_dir = str(tmp_path / "out")
    t = config.tasks.generation
    t.source.path, t.prompt_template, t.answer_field = str(tmp_path / "test.jsonl"), "Q: {question}\nA:", "answers"
    t.fewshot_source.format, t.fewshot_source.path = "jsonl", str(tmp_path / "dev.jsonl")
    t.num_shots, t.sampler, t.max_new_tokens, t.stop = 2, "first_n", 6, ("\n",)
    model, tok = T.build(tiny_model_config(vocab_size=256, max_seq_len=256), seed=2), CharTokenizer()
    results = R.run(config, "mem", model=model, tokenizer=tok)
    lines = (tmp_path / "out" / "samples" / "generation.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    # the shots: the first two of dev.jsonl that are not the evaluated item itself
    assert samples[0]["prompt"] == "Q: colour of grass?\nA: green\n\nQ: 1+1?\nA: 2\n\nQ: capital of France?\nA:"
    assert samples[1]["prompt"] == ("Q: capital of France?\nA: Paris\n\nQ: colour of grass?\nA: green\n\n"
                                    "Q: 2+2?\nA:")
    assert samples[0]["references"] == ["Paris", "paris"]
    # outputs are greedy `inference.generate` continuations, decoded and cut at the stop string
    new = generate(model, [[tok.bos_id] + tok.encode(samples[1]["prompt"])], max_new_tokens=6, stop_tokens=(2,))[0]
    assert samples[1]["output"] == tok.decode([i for i in new if i != 2]).split("\n")[0]
    m = results["tasks"]["generation"]["metrics"]
    assert {"exact_match", "bleu", "rouge1", "rouge2", "rougeL", "num_examples"} <= set(m)
