"""Tiny models, tokenizers and datasets built in the test session: offline, CPU, seconds."""

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("WANDB_MODE", None)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count gives it back: the count changes the last bits of
    later tests' gradients, which some compare byte for byte with a SLURM job's."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<mask>", "<|im_start|>", "<|im_end|>", "<|user|>",
            "<|assistant|>", "<|system|>", "[CLS]", "[SEP]"]  # fmt: skip
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Mix flour, eggs and milk; bake for twenty minutes at 180 degrees.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Write a short poem about the sea and the wind.",
] * 20


def build_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        mask_token="<mask>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = chat_template
    return fast


def build_llama(tokenizer, path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama whose tokenizer has no chat template (the Tulu fallback applies)."""
    return build_llama(build_tokenizer(None), tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_llama_chatml(tmp_path_factory) -> Path:
    """A 2-layer Llama whose tokenizer brings its own (ChatML) chat template."""
    return build_llama(build_tokenizer(CHATML), tmp_path_factory.mktemp("tiny_llama_chatml"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    tokenizer = build_tokenizer(None)
    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def conversations(n: int, long_every: int = 0) -> list[dict]:
    """Tulu-shaped rows of varied length; every `long_every`-th has a very long user turn."""
    rows = []
    for i in range(n):
        words = CORPUS[i % 6].split()
        user = " ".join(words[: 3 + i % 7])
        if long_every and i % long_every == long_every - 1:
            user = " ".join(CORPUS[:6] * 8)
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": " ".join(words[-(2 + i % 5) :])},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "And then?"},
                {"role": "assistant", "content": CORPUS[(i + 1) % 6]},
            ]
        rows.append({"dataset": "toy", "id": f"ex_{i:03d}", "messages": messages})
    return rows


def user_error_line(main, argv, capsys) -> str:
    """Run a command's main as the CLI does; assert exit 2, no traceback; return the error line."""
    from gradproj.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error: ")]  # progress bars aside
    return line


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def sft_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", conversations(13, long_every=5))


@pytest.fixture
def text_file(tmp_path) -> Path:
    rows = [
        {"id": f"doc_{i}", "text": " ".join(CORPUS[i % 6 : i % 6 + 1 + i % 3])} for i in range(9)
    ]
    return write_jsonl(tmp_path / "text.jsonl", rows)


STUDY_TOP_K = 4
VARIANTS = ("full", "rademacher_16")


@pytest.fixture(scope="session")
def tiny_study(tiny_llama, tmp_path_factory) -> dict:
    """Train and test runs (full, rademacher_16) of the tiny model and their score directories,
    made as a user makes them; each test example names a train example as its `source_id`."""
    from gradproj.cli import extract_main, score_main

    root = tmp_path_factory.mktemp("study")
    test_rows = [
        r | {"id": f"q_{i}", "source_id": f"ex_{2 * i:03d}"} for i, r in enumerate(conversations(5))
    ]
    files = {
        "train": write_jsonl(root / "train_set.jsonl", conversations(11, long_every=5)),
        "test": write_jsonl(root / "test_set.jsonl", test_rows),
    }

    def extract(dataset: Path, output: Path) -> dict[str, Path]:
        argv = [str(tiny_llama), str(dataset), "0", "--gradients_output_path", str(output),
                "--max_seq_length", "40", "--gradients_per_file", "3",
                "--random_projection", "--proj_dim", "full,8,16"]  # fmt: skip
        assert extract_main(argv) == 0
        return {v: output / v / tiny_llama.name / dataset.stem / "train/0" for v in VARIANTS}

    def score(train: Path, test: Path, out: Path) -> Path:
        argv = ["--train", str(train), "--test", str(test), "--output", str(out),
                "--top_k", str(STUDY_TOP_K)]  # fmt: skip
        assert score_main(argv) == 0
        return out

    study = {"test_rows": test_rows, "train_file": files["train"], "extract": extract}
    runs = {role: extract(dataset, root / "g") for role, dataset in files.items()}
    study["score"] = lambda test_run, out, variant: score(runs["train"][variant], test_run, out)
    for variant in VARIANTS:
        study["train", variant], study["test", variant] = (
            runs["train"][variant],
            runs["test"][variant],
        )
        out = root / "scores" / variant
        study["scores", variant] = score(runs["train"][variant], runs["test"][variant], out)
    return study


def snapshot(*roots: Path) -> dict:
    """Every path below `roots` with its type and, for a regular file, its bytes' hash (special
    files are never opened): equal snapshots mean nothing there was changed."""
    import hashlib
    import stat

    seen = {}
    for root in roots:
        for path in [Path(root), *sorted(Path(root).rglob("*"))]:
            mode = path.lstat().st_mode
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(mode) else ""
            seen[str(path)] = (stat.S_IFMT(mode), digest)
    return seen
