"""Serve the deployments of `deployments/prefect.yaml` from this process: the embedded default
(`make serve`).

    python deployments/serve.py                    # starts a local Prefect server (SQLite in
                                                   # PREFECT_HOME) on 127.0.0.1:4200, then serves
    PREFECT_API_URL=http://host:4200/api python deployments/serve.py   # onto a running server
    python deployments/serve.py --port 0 --set dataset=npz:small.npz --set epochs=1 --only nightly

Schedules and event triggers are those of prefect.yaml; runs execute in the repository root.
`--set KEY=VALUE` (repeatable) overrides a field of every deployment's `params` form and is
validated before anything starts. Bad input: one line on stderr, exit status 2. The server
started here is stopped on exit (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import typing
import urllib.request
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXIT_BAD_INPUT = 2


class BadServeInput(ValueError):
    pass


def _value(text: str):
    """A `--set` value as YAML reads it: 0.25 → float, true → bool, null → None, else text."""
    value = yaml.safe_load(text)
    return text if isinstance(value, (dict, list)) else value


def overrides_of(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise BadServeInput(f"--set {pair!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = _value(text)
    return out


def params_model(flow):
    """The pydantic model of a flow's `params` argument, if it has one."""
    hints = typing.get_type_hints(flow.fn)
    return hints.get("params")


def load_deployments(path: Path, overrides: dict, only: list[str] | None = None) -> list:
    """RunnerDeployments of the prefect.yaml at `path`, each with its schedules and triggers,
    `overrides` applied to its `params` and validated by that flow's parameter model."""
    from prefect.events import DeploymentEventTrigger
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType
    from pydantic import ValidationError

    spec = yaml.safe_load(path.read_text())
    names = [d["name"] for d in spec["deployments"]]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise BadServeInput(f"--only {', '.join(unknown)}: no such deployment; valid: {', '.join(names)}")
    deployments = []
    for item in spec["deployments"]:
        if only and item["name"] not in only:
            continue
        flow = load_flow_from_entrypoint(item["entrypoint"])
        parameters = dict(item.get("parameters") or {})
        model = params_model(flow)
        if model is not None:
            unknown = sorted(set(overrides) - set(model.model_fields))
            if unknown:
                raise BadServeInput(f"--set {unknown[0]}: not a field of {model.__name__}")
            try:
                parameters["params"] = model.model_validate({**parameters.get("params", {}), **overrides}).model_dump(
                    mode="json", exclude_defaults=True)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "params"
                raise BadServeInput(f"deployment {item['name']}: {where}: {err['msg']}") from None
        schedules = []
        for s in item.get("schedules") or []:
            if "cron" not in s:
                raise BadServeInput(f"deployment {item['name']}: only cron schedules are served ({s})")
            schedules.append(Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True)))
        triggers = [DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"})
                    for t in item.get("triggers") or []]
        deployments.append(flow.to_deployment(
            name=item["name"], description=item.get("description"), tags=item.get("tags"), parameters=parameters,
            schedules=schedules or None, triggers=triggers or None, entrypoint_type=EntrypointType.MODULE_PATH))
    return deployments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@contextlib.contextmanager
def local_server(port: int, timeout: float = 180.0):
    """`prefect server start` on 127.0.0.1:port (no authentication: loopback only), its
    database the SQLite file in PREFECT_HOME; yields the API URL, stops the server after."""
    env = {**os.environ, "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # the UI calls the API at this address
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect = Path(sys.executable).parent / "prefect"
    # its own session: Ctrl-C in the terminal reaches this process only, which stops serving
    # (pausing the deployments through the server) before it stops the server
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"prefect server exited with status {server.returncode}: "
                                   f"{(server.stderr.read() or '').strip().splitlines()[-1:]}")
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not answer on {api} within {timeout:.0f} s")
            time.sleep(0.5)
        yield api
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _sigterm(signum, frame):
    raise KeyboardInterrupt


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise BadServeInput(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="serve.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefect-yaml", default=str(HERE / "prefect.yaml"))
    parser.add_argument("--port", type=int, default=4200, help="port of the local server (0: a free one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of every deployment's params")
    parser.add_argument("--only", action="append", help="serve only this deployment (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="most flow runs at once")
    return parser


def prepare(argv: list[str] | None = None):
    """Parse and check everything before anything starts: (arguments, deployments, API URL or
    None, port). Raises `BadServeInput`."""
    ns = build_parser().parse_args(argv)
    if not Path(ns.prefect_yaml).is_file():
        raise BadServeInput(f"--prefect-yaml {ns.prefect_yaml}: file not found")
    deployments = load_deployments(Path(ns.prefect_yaml), overrides_of(ns.set), ns.only)
    api_url = os.environ.get("PREFECT_API_URL") or None
    port = ns.port or free_port()
    if not api_url and not port_free(port):
        raise BadServeInput(f"--port {port}: 127.0.0.1:{port} is in use (is a server running? then set "
                            f"PREFECT_API_URL=http://127.0.0.1:{port}/api; or --port 0 for a free port)")
    return ns, deployments, api_url, port


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        ns, deployments, api_url, port = prepare(argv)
    except BadServeInput as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from prefect import serve
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    os.chdir(ROOT)  # runs resolve relative run folders and targets in the repository root
    with contextlib.ExitStack() as stack:
        if not api_url:
            api_url = stack.enter_context(local_server(port))
        os.environ["PREFECT_API_URL"] = api_url  # flow-run processes and Dask workers report here
        stack.enter_context(temporary_settings({PREFECT_API_URL: api_url}))
        ui = PREFECT_UI_URL.value() or api_url.removesuffix("/api")
        print(f"Prefect UI: {ui}", flush=True)
        print(f"Deployments: {ui}/deployments  ({', '.join(d.name for d in deployments)})", flush=True)
        try:
            serve(*deployments, limit=ns.limit)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
