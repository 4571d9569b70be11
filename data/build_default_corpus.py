"""Build the embedded default corpus and tokenizer from the Python standard library.

    python -m data.build_default_corpus            # writes data/assets/{default_corpus.jsonl.gz,tokenizer.json}

The corpus is the prose of the running interpreter's standard library: for every stdlib module one
document holding its module, class and function docstrings and its comment blocks in source order,
one document per topic of the language reference that ships in `pydoc_data.topics`, and the
Python license. Everything is read in sorted order and gzip is written without a timestamp, so
the same interpreter always gives the same bytes. The outputs are committed to the repository, so
every machine trains on the same corpus whatever Python it runs; rebuild only to change them.

The tokenizer is a byte-level BPE (HF `tokenizers`) with a 4096-token vocabulary trained on that
corpus, with "<|endoftext|>" (EOS, between documents) and "<|pad|>" as special tokens.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import os
import sysconfig
import tokenize
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
CORPUS_FILE = "default_corpus.jsonl.gz"
TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 4096

# Test suites are mostly string fixtures, not prose; site-packages is not the stdlib.
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_COMMENT_BLOCK_CHARS = 40


def stdlib_python_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def docstrings_in_source_order(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, text) of the module docstring and every class/function docstring."""
    found = []
    module_doc = ast.get_docstring(tree)
    if module_doc:
        found.append((0, module_doc))
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                found.append((node.lineno, f"{kind} {node.name}:\n{doc}"))
    return found


def comment_blocks(source: str) -> list[tuple[int, str]]:
    """(line, text) of runs of comments on consecutive lines, '#' stripped; short blocks dropped."""
    blocks: list[tuple[int, list[str]]] = []
    last_line = -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            text = tok.string.lstrip("#").strip()
            if text.startswith(("!", "-*-")):  # shebang / coding lines
                continue
            if line == last_line + 1 and blocks:
                blocks[-1][1].append(text)
            else:
                blocks.append((line, [text]))
            last_line = line
    except (tokenize.TokenError, SyntaxError, IndentationError):
        pass
    joined = [(line, "\n".join(lines).strip()) for line, lines in blocks]
    return [(line, text) for line, text in joined if len(text) >= MIN_COMMENT_BLOCK_CHARS]


def module_document(path: Path, root: Path) -> str | None:
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    pieces = sorted(docstrings_in_source_order(tree) + comment_blocks(source), key=lambda p: p[0])
    if not pieces:
        return None
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    return f"Module {module}\n\n" + "\n\n".join(text for _, text in pieces)


def build_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [doc for path in stdlib_python_files(root) if (doc := module_document(path, root))]
    try:
        from pydoc_data.topics import topics  # the language reference, as plain text
    except ImportError:
        topics = {}
    docs += [f"Python reference: {name}\n\n{topics[name].strip()}" for name in sorted(topics)]
    license_file = root / "LICENSE.txt"
    if license_file.exists():
        docs.append(license_file.read_text(encoding="utf-8", errors="replace").strip())
    return docs


def write_corpus(docs: list[str], path: Path) -> None:
    lines = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(lines.encode("utf-8"))


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps encode -> decode an exact round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="output folder")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    docs = build_documents()
    write_corpus(docs, args.out / CORPUS_FILE)
    train_tokenizer(docs).save(str(args.out / TOKENIZER_FILE))
    chars = sum(len(d) for d in docs)
    print(f"{len(docs)} documents, {chars / 1e6:.2f} M characters -> {args.out}")


if __name__ == "__main__":
    main()
