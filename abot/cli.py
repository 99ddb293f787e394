"""The `abot` command line (typer). Each command loads a config, then calls one library function."""

from __future__ import annotations

import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from abot.errors import AbotError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train small language models from scratch on MLX.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect SentencePiece tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
data_app = typer.Typer(no_args_is_help=True, help="Prepare training data (pre-tokenized shards).")
app.add_typer(data_app, name="data")
console = Console()

OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.total_steps=20 data.seq_len=128")


@app.command()
def train(config: str = typer.Argument(..., help="YAML config, e.g. configs/tiny.yaml"),
          overrides: Optional[List[str]] = OVERRIDES,
          resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in save_dir")):
    """Pre-train a model as the config says."""
    from abot.config import load_config
    from abot.train import train as run

    summary = run(load_config(config, overrides or []), resume=resume, console=console)
    final = summary.get("final_eval") or {}
    if final:
        console.print(f"Done: step {summary['final_step']}, eval loss {final['loss']:.4f}, ppl {final['ppl']:.2f}.")


@app.command("list")
def list_entries(kind: Optional[str] = typer.Argument(None, help="optimizers, schedules, models, datasets, losses")):
    """List what the registry knows: built-ins and installed plugins."""
    from abot import registry

    kinds = [kind] if kind else list(registry.KINDS)
    for name in kinds:
        if name not in registry.KINDS:
            import difflib

            close = difflib.get_close_matches(name, list(registry.KINDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "."
            raise AbotError(f"unknown kind '{name}'{hint} Kinds: {', '.join(registry.KINDS)}")
        table = Table(title=name, title_justify="left")
        for column in ("name", "from", "summary"):
            table.add_column(column)
        for entry in registry.KINDS[name].entries():
            source = entry.source if entry.source == "abot" else f"{entry.source} {entry.version}".strip()
            table.add_row(entry.name, source, entry.summary)
        console.print(table)


@tokenizer_app.command("train")
def tokenizer_train(config: str = typer.Argument(..., help="YAML config: data source, vocab_size, tokenizer_path"),
                    overrides: Optional[List[str]] = OVERRIDES,
                    force: bool = typer.Option(False, "--force", help="Replace an existing tokenizer")):
    """Train the SentencePiece BPE tokenizer at train.tokenizer_path on the configured data."""
    from pathlib import Path

    from abot.build import ensure_tokenizer
    from abot.config import load_config

    cfg = load_config(config, overrides or [])
    path = Path(cfg.train.tokenizer_path)
    if path.exists() and not force:
        raise AbotError(f"{path} already exists; pass --force to replace it")
    if force:
        path.unlink(missing_ok=True)
    tok = ensure_tokenizer(cfg, console.print)
    console.print(f"Wrote {path}: {tok.vocab_size} tokens, sha256 {tok.sha256[:12]}.")


@data_app.command("prepare")
def data_prepare(config: str = typer.Argument(..., help="YAML config: the text source and the tokenizer"),
                 overrides: Optional[List[str]] = OVERRIDES,
                 out: str = typer.Option(..., "--out", help="folder to write the shards into"),
                 max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="stop train after N tokens"),
                 max_eval_tokens: int = typer.Option(10_000_000, "--max-eval-tokens", help="stop eval after N tokens"),
                 shard_tokens: int = typer.Option(1 << 26, "--shard-tokens", help="tokens per shard file"),
                 force: bool = typer.Option(False, "--force", help="replace shards already in --out")):
    """Tokenize the configured data once into binary shards; train on them with data.source=shards data.dataset=DIR."""
    from abot.config import load_config
    from abot.data.shards import prepare

    meta = prepare(load_config(config, overrides or []), out, max_tokens=max_tokens, max_eval_tokens=max_eval_tokens,
                   tokens_per_shard=shard_tokens, force=force, say=console.print)
    total = meta["splits"]["train"]["total_tokens"]
    console.print(f"Wrote {out}: {total:,} train tokens ({meta['dtype']}). Train on them with: "
                  f"abot train {config} data.source=shards data.dataset={out}")


def main():
    """Entry point: user errors print one clear message, not a traceback."""
    try:
        app()
    except AbotError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
