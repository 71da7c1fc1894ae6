"""A real `blip2 serve` process on 127.0.0.1 over tiny random checkpoints, for the server's tests."""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import tiny_models as tm

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
READY = re.compile(r"blip2 serve: .* on (http://\S+)")


def save_full_model(folder: Path, seed: int = 0) -> Path:
    """A tiny checkpoint with an LLM (OPT) and the stage-1 heads, like the default model: every route works."""
    import torch

    from blip2.convert.checkpoint import save_model
    from blip2.models.blip2 import Blip2Model

    base = tm.our_config("opt")
    cfg = replace(base, stage1_heads=True, qformer=replace(base.qformer, use_text_input=True))
    torch.manual_seed(seed)
    model = Blip2Model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return save_model(model, folder, tm.word_tokenizer("opt"), tm.word_tokenizer("bert"))


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"


class Server:
    """`python -m blip2.cli serve ... --port 0`; the URL comes from its first line."""

    def __init__(self, model: Path | str, *extra: str, timeout: float = 120.0):
        cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", str(model), "--port", "0", "--device", "cpu",
               "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                if self.proc.poll() is not None:
                    break
                continue
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.stderr[-40:]))

    def _drain_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
