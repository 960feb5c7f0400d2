"""A whole Flower deployment on one machine, over loopback: for tests, rehearsals and demos.

``LocalDeployment`` plays every party of a real deployment, each as its own processes and files:

* the **operator** (``prepare``): an admin key, the key registry (public keys only), a private
  key per client in that client's own folder, TLS certificates (a CA and a server certificate
  for 127.0.0.1) and, with ``auth``, an ECDSA P-384 node key per SuperNode;
* the **server**: ``flower-superlink`` (TLS, SuperNode authentication) which starts the ServerApp
  of every submitted run;
* each **client organisation**: a ``flower-supernode`` with its node config (partition, client id,
  the path of its own private key) and its own runtime port;
* the **researcher**: ``flwr run APP local --stream`` with the run config.

Every process runs under ``timeout`` in its own session, with its output in ``workdir/logs``;
``stop()`` (also on leaving a ``with`` block) ends them all (SIGTERM, then SIGKILL to the whole
process group) and reports any process still alive. Only 127.0.0.1 is used.

Flower facts this relies on (flwr 1.42): the Flower executables start each other by name, so the
venv's ``bin`` is put first on ``PATH``; connections live in ``$FLWR_HOME/config.toml``; runtime
dependency installation is disabled (the app's dependencies are installed already); and a
ClientApp process must check in with its SuperNode within 30 s of the task being claimed
(``HEARTBEAT_DEFAULT_INTERVAL`` in Flower), or the task is re-queued and the late process gets
``401 Runtime task-token authentication failed`` -- the 401 of an overloaded machine.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PhalanxError

__all__ = ["LocalDeployment", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_tls(out: Path) -> dict[str, Path]:
    """A CA and a server certificate for IP 127.0.0.1 (and localhost), as PEM files in ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("phalanx local CA")).issuer_name(name("phalanx local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out / "ca.crt", "cert": out / "server.crt", "key": out / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


@dataclass
class Node:
    index: int
    client_id: str
    folder: Path
    port: int
    private_key: Path
    auth_key: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen | None = None


class LocalDeployment:
    """SuperLink + ``nodes`` SuperNodes on 127.0.0.1 (see the module docstring).

    workdir: a fresh folder for every file. app_dir: the Flower app to submit. tls / auth: TLS
    with generated certificates, and SuperNode authentication (needs TLS). node_config: node index
    -> extra node-config entries (fault drills). limit: seconds any process may live.
    """

    def __init__(self, workdir: str | Path, nodes: int, app_dir: str | Path, *, tls: bool = True,
                 auth: bool = True, node_config: dict[int, dict[str, Any]] | None = None, limit: float = 900,
                 bin_dir: str | Path | None = None):
        if auth and not tls:
            raise PhalanxError("LocalDeployment: SuperNode authentication needs TLS (auth=True, tls=False)")
        self.work = Path(workdir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.tls, self.auth, self.limit = tls, auth, float(limit)
        self.bin = Path(bin_dir) if bin_dir is not None else Path(sys.executable).parent
        self.port = free_port()
        self.nodes = [Node(i, f"org{i}", self.work / "clients" / f"org{i}", free_port(),
                           self.work / "clients" / f"org{i}" / f"org{i}.key.pem",
                           extra=dict((node_config or {}).get(i, {}))) for i in range(nodes)]
        self.superlink: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.logs = self.work / "logs"
        self.registry = self.work / "server" / "registry"
        self.admin_key = self.work / "admin" / "admin.key.pem"
        self.certs: dict[str, Path] = {}
        self.admin_fingerprint = ""

    # ------------------------------------------------------------------ setup
    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.work / "flwr-home")
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # start a ClientApp 0.2 s after its task, not 1 s
        env.pop("FLWR_LOG_LEVEL", None)
        return env

    def prepare(self) -> None:
        """Keys (admin, registry, one private key per client), TLS certificates, node keys, config."""
        from ..keys import KeyRegistry, fingerprint, new_private_key, write_private_key

        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        admin = new_private_key()
        write_private_key(self.admin_key, admin)
        self.admin_fingerprint = fingerprint(admin.public_key())
        reg = KeyRegistry(dir=self.registry, admin_key=admin)
        for node in self.nodes:  # each organisation's key lands in its own folder, never the registry
            reg.generate(node.client_id, private_dir=node.folder)
            if self.auth:
                node.auth_key = node.folder / "node_auth"
                subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", node.client_id,
                                "-f", str(node.auth_key)], check=True, capture_output=True, timeout=60)
        if self.tls:
            self.certs = make_tls(self.work / "tls")
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        conn = {"address": f"127.0.0.1:{self.port}"}
        conn.update({"root-certificates": str(self.certs["ca"])} if self.tls else {"insecure": True})
        (home / "config.toml").write_text("[superlink]\ndefault = \"local\"\n\n[superlink.local]\n"
                                          + "".join(f"{k} = {_toml_value(v)}\n" for k, v in conn.items()))

    def _spawn(self, name: str, cmd: list[str], limit: float | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        full = ["timeout", "--signal=TERM", "--kill-after=10", str(int(limit or self.limit)), *cmd]
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def start_superlink(self, wait: float = 120) -> None:
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(self.work / "server" / "state.db")]
        if self.tls:
            cmd += ["--ssl-certfile", str(self.certs["cert"]), "--ssl-keyfile", str(self.certs["key"]),
                    "--ssl-ca-certfile", str(self.certs["ca"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", cmd)
        self._wait_port(self.port, wait, self.superlink, "superlink")

    def _wait_port(self, port: int, wait: float, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise PhalanxError(f"{name} exited with code {proc.returncode}; see {self.logs / (name + '.log')}")
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.5)
        raise PhalanxError(f"{name} did not listen on 127.0.0.1:{port} within {wait:.0f} s")

    def register_nodes(self) -> None:
        """``flwr supernode register`` each node's public key while the SuperLink runs."""
        if not self.auth:
            return
        for node in self.nodes:
            res = subprocess.run(["flwr", "supernode", "register", str(node.auth_key) + ".pub", "local"],
                                 capture_output=True, text=True, env=self.env, cwd=self.work, timeout=120)
            (self.logs / f"register-{node.client_id}.log").write_text(res.stdout + res.stderr)
            if res.returncode != 0:
                raise PhalanxError(f"flwr supernode register {node.client_id} failed ({res.returncode}): "
                                   f"{(res.stdout + res.stderr).strip()[-400:]}")

    def node_config(self, node: Node) -> str:
        cfg = {"partition-id": node.index, "num-partitions": len(self.nodes),
               "phalanx-client-id": node.client_id, "phalanx-private-key": str(node.private_key), **node.extra}
        return " ".join(f"{k}={_toml_value(v)}" for k, v in cfg.items())

    def start_node(self, i: int) -> None:
        node = self.nodes[i]
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
               "--port", str(node.port), "--node-config", self.node_config(node)]
        cmd += ["--root-certificates", str(self.certs["ca"])] if self.tls else ["--insecure"]
        if self.auth:
            cmd += ["--auth-supernode-private-key", str(node.auth_key)]
        node.proc = self._spawn(f"supernode-{node.client_id}", cmd)

    def start(self) -> None:
        """Prepare, start the SuperLink, register and start every SuperNode."""
        self.prepare()
        self.start_superlink()
        self.register_nodes()
        for i in range(len(self.nodes)):
            self.start_node(i)

    def submit(self, run_config: dict[str, Any], name: str = "run", limit: float | None = None) -> subprocess.Popen:
        """``flwr run APP local --stream --run-config ...``; its output goes to logs/NAME.log."""
        rc = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        return self._spawn(name, ["flwr", "run", str(self.app_dir), "local", "--stream", "--run-config", rc],
                           limit=limit)

    # ------------------------------------------------------------------ faults and teardown
    def kill_node(self, i: int) -> None:
        """SIGKILL a SuperNode and everything it started (its ClientApp processes)."""
        node = self.nodes[i]
        if node.proc is not None:
            _kill_group(node.proc, signal.SIGKILL)
            node.proc.wait(timeout=30)
        for pid in _children_matching(node.port):
            _kill_pid(pid)

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and the ServerApp it runs (the server machine going down)."""
        if self.superlink is not None:
            _kill_group(self.superlink, signal.SIGKILL)
            self.superlink.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the old processes are gone and the port is free
            left = _children_matching(self.port, exclude_nodes=True)
            for pid in left:
                _kill_pid(pid)
            with socket.socket() as s:
                s.settimeout(1)
                if not left and s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.5)
        raise PhalanxError(f"the SuperLink on port {self.port} did not go away within 30 s")

    def restart_superlink(self, wait: float = 120) -> None:
        """Kill the server side and start it again on the same port and state database (the
        SuperNodes keep retrying and reconnect)."""
        self.kill_superlink()
        self.start_superlink(wait)

    def stop(self) -> list[str]:
        """End every process started here; return the command lines of any that survived."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            _kill_group(proc, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        ports = [self.port] + [n.port for n in self.nodes]
        for _ in range(15):  # a SuperExec and the apps it started live in sessions of their own
            left = sorted({pid for p in ports for pid in _children_matching(p)})
            if not left:
                return []
            for pid in left:
                _kill_pid(pid)
            time.sleep(1)
        return [_cmdline(pid) for pid in sorted({pid for p in ports for pid in _children_matching(p)})]

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children_matching(port: int, exclude_nodes: bool = False) -> list[int]:
    """This user's Flower processes whose command line names ``port`` (as a port: not inside a longer
    number): a SuperLink or SuperNode and the SuperExec, ServerApp and ClientApp processes it started."""
    pattern = re.compile(rf"(?<![0-9]){port}(?![0-9])")
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        cmd = _cmdline(int(d.name))
        if pattern.search(cmd) and any(x in cmd for x in ("flwr-", "flower-")):
            if exclude_nodes and "flower-supernode" in cmd:
                continue
            out.append(int(d.name))
    return out
