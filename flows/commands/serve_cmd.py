"""``mammo serve``: an MLflow scoring server for one of this project's registered models, checked first.

Why not ``mlflow models serve -m models:/...`` directly: MLflow loads whatever the registered version's
MLmodel names, and a ``path`` column would read any file the server can read. This command verifies the
version first (``tasks.serving.model_trust``: our loader module, the file digests recorded at registration), then
runs ``mlflow models serve --env-manager local`` on the verified local copy, with the allowed root for
served paths and the size caps in its environment (``mammo_core.inference.served_inputs``). Without
``--allowed-root`` the server classifies arrays only: every ``path`` gets the same refusal.

It binds 127.0.0.1 by default; put a reverse proxy with authentication in front to serve a team.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

from flows import environment
from flows.commands.predict_cmd import fetch_model
from mammo_core.inference import served_inputs
from mammo_core.inference.served_inputs import ServeLimits


def serve(
    model: str = typer.Option("models:/mammo-classifier@champion", "--model", "-m", help="registered model URI"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
    host: str = typer.Option("127.0.0.1", "--host", "-h", help="address to bind"),
    port: int = typer.Option(5001, "--port", "-p", help="port"),
    allowed_root: Path | None = typer.Option(None, "--allowed-root", help="the only folder served `path` values "
                                             "are read from (default: none, arrays only)"),
    max_pixels: int = typer.Option(served_inputs.DEFAULT_MAX_PIXELS, "--max-pixels", min=1,
                                   help="largest array or decoded image served, in pixels"),
    max_file_bytes: int = typer.Option(served_inputs.DEFAULT_MAX_FILE_BYTES, "--max-file-bytes", min=1,
                                       help="largest file read for a `path`, in bytes"),
    max_rows: int = typer.Option(served_inputs.DEFAULT_MAX_ROWS, "--max-rows", min=1, help="rows per request"),
) -> None:
    """Serve a verified registered model (MLflow scoring server: /ping, /invocations)."""
    root = environment.store_root(store)
    environment.configure(root)
    from tasks.tracking import default_tracking_uri

    if allowed_root is not None and not allowed_root.is_dir():
        raise typer.BadParameter(f"{allowed_root} is not a folder", param_hint="--allowed-root")
    limits = ServeLimits(allowed_root.resolve() if allowed_root else None, max_pixels, max_file_bytes, max_rows)
    with tempfile.TemporaryDirectory(prefix="mammo-serve-") as tmp:
        verified = fetch_model(model, default_tracking_uri(root), Path(tmp))
        env = {k: v for k, v in os.environ.items() if k != served_inputs.ENV_ROOT} | limits.env()
        # MLflow starts `uvicorn` by name: find it next to this interpreter even in a venv that is not activated
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        typer.echo(f"serving {verified.name} version {verified.version} on http://{host}:{port} "
                   f"(paths under: {limits.root or 'none, arrays only'})", err=True)
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(verified.path), "--env-manager",
               "local", "-h", host, "-p", str(port)]
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: its workers stop with it
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                code = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    raise typer.Exit(code)


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the server like Ctrl-C does (and the verified copy is removed)."""
    raise KeyboardInterrupt
