"""The `md4 push` and `md4 serve` commands: argument parsing only (md4.publish, md4.serve do the work).

Registered by md4.cli with add_parsers(subparsers); the heavy imports happen when a command runs.
"""

from __future__ import annotations

from md4.errors import UserError


def cmd_push(args) -> None:
    from md4 import publish

    if args.out:
        print(f"model files and card written to {publish.stage(args.run, args.repo_id, args.out, args.license)}")
        return
    url = publish.push(args.run, args.repo_id, private=args.private, license=args.license, message=args.message)
    print(f"pushed to {url}")


def cmd_serve(args) -> None:
    from md4 import serve

    if not 0 <= args.port < 65536:
        raise UserError(f"--port must lie in 0..65535, got {args.port}.")
    serve.serve(args.path, host=args.host, port=args.port, device=args.device, max_steps=args.max_steps)


def add_parsers(sub) -> None:
    p = sub.add_parser("push", help="upload a run's model to the Hugging Face Hub with a generated model card")
    p.add_argument("run", help="run folder or model folder (config.json + model.safetensors)")
    p.add_argument("repo_id", help="Hub repo, org/name (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--license", default="apache-2.0", help="license in the card's metadata (default apache-2.0)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--out", metavar="DIR", help="write the files (and the card) to DIR instead of uploading")
    p.set_defaults(fn=cmd_push)

    s = sub.add_parser("serve", help="a playground page: fill blanks or continue a prompt, watch the denoising")
    s.add_argument("path", help="run folder, model folder or Hub repo id")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--max-steps", type=int, default=1000, help="the most sampling steps a request may ask for")
    s.set_defaults(fn=cmd_serve)
