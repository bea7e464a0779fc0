"""`taps drafters list|add|remove`: manage drafters of a running server over its admin HTTP routes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(args) -> int:
    import httpx

    key = args.admin_key or os.environ.get("TAPS_ADMIN_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    base = args.url.rstrip("/")
    with httpx.Client(timeout=900, headers=headers) as client:
        if args.action == "list":
            r = client.get(f"{base}/v1/drafters")
        elif args.action == "add":
            if not args.name or not args.checkpoint:
                raise ValueError("taps drafters add needs --name and --checkpoint")
            ckpt = str(Path(args.checkpoint).expanduser().resolve())
            r = client.post(f"{base}/v1/drafters", json={"name": args.name, "checkpoint": ckpt,
                                                         "replicas": args.replicas})
        else:
            if not args.name:
                raise ValueError("taps drafters remove needs --name")
            r = client.delete(f"{base}/v1/drafters/{args.name}")
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text}}
    if r.status_code >= 400:
        msg = body.get("error", {}).get("message", r.text) if isinstance(body, dict) else r.text
        print(f"taps drafters {args.action}: error {r.status_code}: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=2))
    return 0
