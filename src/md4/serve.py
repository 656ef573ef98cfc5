"""`md4 serve RUN`: a playground page that streams the denoising as it happens.

    md4 serve runs/demo               # http://127.0.0.1:8000/
    md4 serve org/name --port 7860 --host 0.0.0.0     # e.g. in a Docker Space on the Hugging Face Hub

The stack is the standard library alone: a threading HTTP server, one static page
(md4/static/playground.html, plain JavaScript) and server-sent events. A user installs nothing
beyond md4, the page works offline, and every intermediate state reaches the browser the moment
the sampler produces it. (Gradio would fit Spaces' Gradio SDK, but brings a large dependency
tree and its own front end for what is one form and one stream.)

Routes:
    GET /          the page
    GET /info      JSON: what the model is and which options apply
    GET /sample?   an event stream: `state` events {text | image, step, steps, t} after every step
                   that changed something, then `done` {text | image, seconds}; or a single
                   `problem` {message} event when the request is refused (bad characters, too
                   long, steps out of range, ...).
Text models take `text` with `mode`=infill ("_" marks the characters to fill, the others are
kept) or prompt (the text starts the sequence, the rest of the model length is generated);
image models take `num`, and `label` and `guidance` when class-conditional. Both take sampler,
steps, temperature, top_p and seed. One request samples at a time (a lock); others wait.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch

from md4.conditional import text_condition
from md4.errors import UserError
from md4.sampling import check_sampler, supported_samplers

PAGE = Path(__file__).parent / "static" / "playground.html"
MAX_IMAGES = 16


def is_image(model) -> bool:
    return model.tokenizer.name == "image"


def info(model, max_steps: int) -> dict:
    """What the page needs to know about the model."""
    tok = model.tokenizer
    out = {"source": str(model.source), "method": model.config.method, "kind": "image" if is_image(model) else "text",
           "length": model.length, "steps": model.config.sample.steps, "max_steps": max_steps,
           "samplers": supported_samplers(model.method),
           "num_classes": model.num_classes, "infill": hasattr(tok, "alphabet")}
    if hasattr(tok, "alphabet"):
        out["alphabet"] = tok.alphabet
    return out


# how the messages name the query parameters (default: the name, capitalized)
NAMES = {"num": "The number of images", "top_p": "Top-p", "label": "The class label"}


def _number(params: dict, name: str, kind, default, low, high):
    """A query parameter as int or float within [low, high], or the default when absent."""
    raw = params.get(name, [""])[-1].strip()
    if raw == "":
        return default
    what = NAMES.get(name, name.capitalize())
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"{what} must be a number, got {raw!r}.")
    if not low <= value <= high:
        raise UserError(f"{what} must lie between {low:g} and {high:g}, got {raw}.")
    return value


def check_text(model, text: str) -> None:
    """Refuse characters the model cannot write (characters models: its alphabet and "_")."""
    alphabet = getattr(model.tokenizer, "alphabet", None)
    if alphabet is None:
        return
    folded = text if any(c.isupper() for c in alphabet) else text.lower()
    bad = sorted({c for c in folded if c not in alphabet and c != "_"})
    if bad:
        shown = " ".join(repr(c) for c in bad[:5])
        raise UserError(f"The text has characters this model does not know ({shown}); it writes only "
                        f"{'a-z and space' if alphabet.strip() == 'abcdefghijklmnopqrstuvwxyz' else repr(alphabet)}, "
                        "with _ for a blank.")


def parse_request(model, params: dict, max_steps: int) -> dict:
    """model.sample keyword arguments (plus num) from the query parameters; a UserError for bad input."""
    opts = {"steps": _number(params, "steps", int, model.config.sample.steps, 1, max_steps),
            "seed": _number(params, "seed", int, 0, 0, 2**31 - 1)}
    if model.method.reverse_process:
        sampler = params.get("sampler", ["ancestral"])[-1] or "ancestral"
        check_sampler(model.method, sampler, time_independent=not model.net.uses_time)
        opts.update(sampler=sampler, temperature=_number(params, "temperature", float, 1.0, 0.0, 10.0),
                    top_p=_number(params, "top_p", float, 1.0, 0.01, 1.0))
    if is_image(model):
        opts["num"] = _number(params, "num", int, 4, 1, MAX_IMAGES)
        if model.num_classes:
            label = params.get("label", [""])[-1].strip()
            if label:
                opts["labels"] = _number(params, "label", int, 0, 0, model.num_classes - 1)
                opts["guidance"] = _number(params, "guidance", float, 0.0, 0.0, 20.0)
        return opts
    if not model.method.reverse_process:
        raise UserError(f"The playground fills text with masked diffusion models; this one is {model.config.method}.")
    text = params.get("text", [""])[-1]
    mode = params.get("mode", ["infill"])[-1]
    if mode not in ("infill", "prompt"):
        raise UserError(f"Mode must be infill or prompt, got {mode!r}.")
    if not text:
        raise UserError("Type a text: with _ for the characters to fill, or a prompt to continue.")
    if mode == "infill" and not hasattr(model.tokenizer, "alphabet"):
        raise UserError("Blanks (_) work with character models; choose prompt to continue the text.")
    check_text(model, text)
    if mode == "infill" and "_" not in text:
        raise UserError("Mark the characters to fill with _ (or choose prompt to continue the text).")
    if hasattr(model.tokenizer, "alphabet") and len(text) > model.length:
        raise UserError(f"The text has {len(text)} characters; this model writes at most {model.length}.")
    known, mask = text_condition(model.tokenizer, text, None if mode == "infill" else model.length)
    opts.update(num=1, known=known, known_mask=mask)
    return opts


def picture(model, x: torch.Tensor) -> str:
    """Samples [B, N] (masks allowed) as a PNG grid data URL."""
    from md4 import pictures

    tok = model.tokenizer
    grid = pictures.tile(pictures.render(x.cpu(), tok, pictures.default_scale(tok)), int(np.ceil(np.sqrt(len(x)))))
    return "data:image/png;base64," + base64.b64encode(pictures.png_bytes(grid)).decode()


def run(model, opts: dict, emit) -> None:
    """Sample with `opts` (parse_request), calling emit(event, data) at every step and at the end."""
    steps, num = opts["steps"], opts.pop("num")
    show = (lambda x: {"image": picture(model, x)}) if is_image(model) else (lambda x: {"text": model.decode(x[:1])[0]})
    count = {"step": 0}

    def callback(x, t):  # called at the start (t = 1), after every step, and once more at the end
        emit("state", {**show(x), "step": min(count["step"], steps), "steps": steps, "t": float(t[0])})
        count["step"] += 1

    t0 = time.time()
    x = model.sample(num, callback=callback, **opts) if model.method.reverse_process else model.sample(num, **opts)
    emit("done", {**show(x), "seconds": round(time.time() - t0, 3)})


class Handler(BaseHTTPRequestHandler):
    """The page, /info and the /sample event stream; the server holds model, lock and max_steps."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: one line per request is noise in a terminal
        pass

    def send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlparse(self.path)
        srv = self.server
        if url.path == "/":
            self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif url.path == "/info":
            self.send(200, json.dumps(info(srv.model, srv.max_steps)).encode(), "application/json")
        elif url.path == "/sample":
            self.stream(parse_qs(url.query, keep_blank_values=True))
        else:
            self.send(404, b"not found", "text/plain")

    def stream(self, params: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def emit(event: str, data: dict) -> None:
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        srv = self.server
        try:
            opts = parse_request(srv.model, params, srv.max_steps)
            with srv.lock, torch.no_grad():
                run(srv.model, opts, emit)
        except UserError as e:
            emit("problem", {"message": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away; the sampling stopped at its next step


def make_server(model, host: str = "127.0.0.1", port: int = 8000, max_steps: int = 1000) -> ThreadingHTTPServer:
    """The playground server for a loaded model (port 0: any free port; see server_address)."""
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UserError(f"Cannot listen on {host}:{port} ({e.strerror or e}).")
    server.daemon_threads = True
    server.model, server.lock, server.max_steps = model, threading.Lock(), max_steps
    return server


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", max_steps: int = 1000) -> None:
    """Load the model at `path` (run or model folder, or Hub repo id) and serve the page until Ctrl-C."""
    import md4

    if max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {max_steps}.")
    server = make_server(md4.load(path, device=device), host, port, max_steps)
    print(f"md4 playground: http://{server.server_address[0]}:{server.server_address[1]}/  (Ctrl-C stops it)")
    try:
        server.serve_forever()
    finally:
        server.server_close()
