"""The model and job repository: what laked hosts, placed there by admins.

A directory named by laked's configuration (``repository.path``)::

    REPO/models/NAME/model.pt      TorchScript (torch.jit.save), or
    REPO/models/NAME/model.pt2     torch.export (torch.export.save)
    REPO/models/NAME/config.toml   class, quota_sms, priority, max_batch, dtype, warmup
    REPO/jobs/NAME/job.py          defines run(ctx) -> None
    REPO/jobs/NAME/config.toml     class (BE), quota_sms, priority

Names are ``[A-Za-z0-9_.-]{1,64}`` without a leading dot (dot names are
laked's own temporary files).

**No user code ever runs inside laked unless an admin put it in the
repository.**  What makes that true:

- Before laked reads or imports any file of the repository (model, job,
  config), ``check_trusted`` checks the file, its directory and every
  directory from there up to REPO itself.  Each must be owned by root, or
  by a member of the admin group with the admin group as its group (laked
  running unprivileged, as in development, also trusts its own uid); none
  may be writable by others, nor by its group unless that group is root's
  or the admin group.  So only root and admins could have written the
  file, or swapped it or any directory on the way for another one.
  Symbolic links inside REPO are refused rather than followed.  A file
  failing the check is refused with its path and the reason.
- Files reach the repository only from an admin (``add``, checked with
  ``may_admin`` on the uid the kernel reports for the client's socket,
  never a name the client sends) or from root's own shell.  laked reads
  what the client sends from the file descriptor the client opened (it
  never opens a path a user names) and writes it root-owned, mode 0644.
- Job code is imported at every start, after the check, from the bytes
  laked has just read and checked, into a fresh module object.

Pure file logic: no torch (the format check reads the zip directory).
"""
from __future__ import annotations

import ast
import grp
import logging
import os
import pwd
import re
import shutil
import stat
import tempfile
import tomllib
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .tenants import BE, CLASSES, QuotaError

log = logging.getLogger("laked.repo")

KINDS = ("model", "job")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MODEL_FILES = {"torchscript": "model.pt", "export": "model.pt2"}
JOB_FILE = "job.py"
CONFIG_FILE = "config.toml"
MAX_MODEL_BYTES = 2 << 30       # a model file (weights included)
MAX_JOB_BYTES = 1 << 20         # job.py
MAX_CONFIG_BYTES = 64 << 10     # config.toml
DTYPES = ("float32", "float16", "bfloat16", "float64",
          "int64", "int32", "int16", "int8", "uint8", "bool")
MAX_QUOTA_SMS = 4096
MAX_PRIORITY = 1000
MAX_BATCH = 1 << 20


class RepoError(ValueError):
    """A repository entry or request that is wrong; the message says what and where."""


class UntrustedError(RepoError):
    """A repository file that someone other than root or an admin could have written."""


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.startswith("."):
        raise RepoError(f"{what} {name!r}: 1-64 of A-Z a-z 0-9 _ . - without a leading dot")
    return name


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RepoError(f"kind {kind!r}: must be model or job")
    return kind


# ---------------------------------------------------------------- configs

@dataclass(frozen=True)
class ModelConfig:
    cls: str = BE
    quota_sms: int = 0
    priority: int = 0
    max_batch: int = 64
    dtype: str = "float32"      # what inputs are cast to before the forward
    warmup: bool = True         # one untimed forward at the first request's shape


@dataclass(frozen=True)
class JobConfig:
    cls: str = BE
    quota_sms: int = 0
    priority: int = 0


def _check_int(where: str, key: str, v: Any, lo: int, hi: int) -> int:
    # bool is an int to Python; "true" is no quota
    if not isinstance(v, int) or isinstance(v, bool):
        raise RepoError(f"{where}: {key} must be an integer, not {type(v).__name__} {v!r}")
    if not lo <= v <= hi:
        raise RepoError(f"{where}: {key} = {v} is out of range [{lo}, {hi}]")
    return v


def parse_config(kind: str, raw: dict[str, Any], where: str) -> ModelConfig | JobConfig:
    """Validate a config (from config.toml or a client's dict); defaults fill the rest."""
    check_kind(kind)
    if not isinstance(raw, dict):
        raise RepoError(f"{where}: config must be a table, not {type(raw).__name__}")
    allowed = ("class", "quota_sms", "priority") + (
        ("max_batch", "dtype", "warmup") if kind == "model" else ())
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise RepoError(f"{where}: unknown key(s) {', '.join(unknown)} "
                        f"(a {kind} config takes {', '.join(allowed)})")
    out: dict[str, Any] = {}
    if "class" in raw:
        c = raw["class"]
        if c not in CLASSES:
            raise RepoError(f"{where}: class must be \"LC\" or \"BE\", not {c!r}")
        if kind == "job" and c != BE:
            # a job runs inside arbiter.be(): it is paced, never latency-critical
            raise RepoError(f"{where}: hosted jobs are best-effort: class must be \"BE\"")
        out["cls"] = c
    if "quota_sms" in raw:
        out["quota_sms"] = _check_int(where, "quota_sms", raw["quota_sms"], 0, MAX_QUOTA_SMS)
    if "priority" in raw:
        out["priority"] = _check_int(where, "priority", raw["priority"],
                                     -MAX_PRIORITY, MAX_PRIORITY)
    if kind == "job":
        return JobConfig(**out)
    if "max_batch" in raw:
        out["max_batch"] = _check_int(where, "max_batch", raw["max_batch"], 1, MAX_BATCH)
    if "dtype" in raw:
        d = raw["dtype"]
        if d not in DTYPES:
            raise RepoError(f"{where}: dtype {d!r} is not one of {', '.join(DTYPES)}")
        out["dtype"] = d
    if "warmup" in raw:
        if not isinstance(raw["warmup"], bool):
            raise RepoError(f"{where}: warmup must be true or false, not {raw['warmup']!r}")
        out["warmup"] = raw["warmup"]
    return ModelConfig(**out)


def config_dict(cfg: ModelConfig | JobConfig) -> dict[str, Any]:
    """The config as config.toml spells it ("class", not "cls")."""
    d = asdict(cfg)
    return {"class": d.pop("cls"), **d}


def config_toml(cfg: ModelConfig | JobConfig) -> str:
    lines = ["# written by laked (repo add); edit as root or an admin"]
    order = ["class"] + [f.name for f in fields(cfg) if f.name != "cls"]
    d = config_dict(cfg)
    for k in order:
        v = d[k]
        # the values are validated names, numbers and flags: no escaping needed
        lines.append(f"{k} = " + ("true" if v is True else "false" if v is False
                                  else f'"{v}"' if isinstance(v, str) else str(v)))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- formats

def detect_format(path: Path, label: str | None = None) -> str:
    """"torchscript" or "export" from the archive's entries; RepoError otherwise.

    ``label`` names the file in messages (default: its path)."""
    what = label or str(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise RepoError(f"{what}: not a TorchScript or torch.export file "
                        f"(not a valid zip archive: {e})") from None
    # both formats are a zip with one top folder; torch.export writes
    # archive_format ("pt2"), TorchScript writes its code/ and constants.pkl
    tails = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if "archive_format" in tails:
        return "export"
    if "constants.pkl" in tails and any(t.startswith("code/") for t in tails):
        return "torchscript"
    if "data.pkl" in tails:
        raise RepoError(f"{what}: a torch.save pickle (weights), not a model: save it "
                        f"with torch.jit.save(torch.jit.script(m)) or torch.export.save")
    raise RepoError(f"{what}: a zip archive but neither TorchScript nor torch.export")


# ---------------------------------------------------------------- trust

def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "an unknown user"


class Repository:
    def __init__(self, path: Path, admin_group: str | None = None) -> None:
        # the configured path may be a symlink (e.g. to a data disk): resolve
        # it once; below it, links are refused
        self.path = Path(os.path.abspath(path))
        self.admin_group = admin_group
        self._warned = False

    # who counts as an admin -------------------------------------------

    def _admin_gid(self) -> int | None:
        if not self.admin_group:
            return None
        try:
            return grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            if not self._warned:   # looked up at every check: say it once
                log.warning("admin group %r does not exist: only root administers the "
                            "repository", self.admin_group)
                self._warned = True
            return None

    def _in_admin_group(self, uid: int, admin_gid: int | None) -> bool:
        if admin_gid is None:
            return False
        try:
            pw = pwd.getpwuid(uid)
            gr = grp.getgrgid(admin_gid)
        except KeyError:
            return False
        return pw.pw_gid == admin_gid or pw.pw_name in gr.gr_mem

    def may_admin(self, uid: int, gid: int) -> bool:
        """Root, or a user in the admin group.  Looked up by the uid the kernel
        reports (SO_PEERCRED); ``gid`` (the process's) is not proof of membership:
        a setgid program runs with a group its user is not in."""
        del gid
        return uid == 0 or self._in_admin_group(uid, self._admin_gid())

    def require_admin(self, uid: int, gid: int, what: str) -> None:
        if not self.may_admin(uid, gid):
            who = (f"a member of group {self.admin_group!r}" if self.admin_group
                   else "root (laked has no admin group configured)")
            raise QuotaError(f"{what}: only {who} may change the repository; "
                             f"{_user(uid)} (uid {uid}) may not")

    # the check ------------------------------------------------------------

    def _trusted_owner(self, uid: int, admin_gid: int | None, st_gid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True  # root; or laked's own uid when it runs unprivileged
        return admin_gid is not None and st_gid == admin_gid and \
            self._in_admin_group(uid, admin_gid)

    def _check_one(self, path: Path, st: os.stat_result, admin_gid: int | None) -> None:
        mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
        if not self._trusted_owner(st.st_uid, admin_gid, st.st_gid):
            group = f"group {self.admin_group!r}" if self.admin_group else "no admin group"
            raise UntrustedError(
                f"{path} is owned by {_user(st.st_uid)} (uid {st.st_uid}, gid {st.st_gid}), "
                f"who is neither root nor an admin ({group}): refusing to load it")
        if st.st_mode & stat.S_IWOTH:
            raise UntrustedError(f"{path} is writable by others ({mode}): refusing to load it")
        if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, admin_gid):
            raise UntrustedError(f"{path} is writable by group {st.st_gid}, which is not "
                                 f"root's or the admin group ({mode}): refusing to load it")

    def check_trusted(self, path: Path) -> os.stat_result:
        """Check ``path`` and each directory up to REPO; returns path's lstat.

        Raises UntrustedError naming the path and the reason, RepoError for a
        path outside REPO, a link, or one that does not exist."""
        path = Path(os.path.abspath(path))
        try:
            rel = path.relative_to(self.path)
        except ValueError:
            raise RepoError(f"{path} is outside the repository {self.path}") from None
        admin_gid = self._admin_gid()
        chain = [self.path]
        for part in rel.parts:
            chain.append(chain[-1] / part)
        first = None
        for p in reversed(chain):          # the file first: its error is the useful one
            try:
                st = os.stat(p) if p == self.path else os.lstat(p)
            except FileNotFoundError:
                raise RepoError(f"{p} does not exist") from None
            except OSError as e:
                raise RepoError(f"{p}: {e.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise UntrustedError(f"{p} is a symbolic link: refusing to follow it")
            self._check_one(p, st, admin_gid)
            if first is None:
                first = st
        assert first is not None
        return first

    def read_trusted(self, path: Path, limit: int) -> bytes:
        """The bytes of a checked file, read from the descriptor that was checked."""
        self.check_trusted(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise RepoError(f"{path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RepoError(f"{path} is not a regular file")
            # the same file as checked: a swap in between would need a
            # writable directory on the way, which the check excluded
            self._check_one(path, st, self._admin_gid())
            return _read_fd(fd, limit, str(path))
        finally:
            os.close(fd)

    # layout ----------------------------------------------------------------

    def entry_dir(self, kind: str, name: str) -> Path:
        return self.path / f"{check_kind(kind)}s" / check_name(name, f"{kind} name")

    def names(self, kind: str) -> list[str]:
        """Entries of models/ or jobs/ (not checked yet; dot names skipped)."""
        d = self.path / f"{check_kind(kind)}s"
        try:
            return sorted(n for n in os.listdir(d) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def config(self, kind: str, name: str) -> ModelConfig | JobConfig:
        path = self.entry_dir(kind, name) / CONFIG_FILE
        try:
            os.lstat(path)
        except FileNotFoundError:
            # no config: the defaults, but the directory must still be trusted
            self.check_trusted(path.parent)
            return parse_config(kind, {}, str(path))
        text = self.read_trusted(path, MAX_CONFIG_BYTES)
        try:
            raw = tomllib.loads(text.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise RepoError(f"{path}: not valid TOML: {e}") from None
        return parse_config(kind, raw, str(path))

    def model_file(self, name: str) -> tuple[Path, str]:
        """The checked model file and its format (from its content)."""
        d = self.entry_dir("model", name)
        present = [d / f for f in MODEL_FILES.values() if os.path.lexists(d / f)]
        if not present:
            raise RepoError(f"{d} has neither model.pt (TorchScript) nor model.pt2 "
                            f"(torch.export)")
        if len(present) > 1:
            raise RepoError(f"{d} has both model.pt and model.pt2: keep one")
        path = present[0]
        st = self.check_trusted(path)
        if not stat.S_ISREG(st.st_mode):
            raise RepoError(f"{path} is not a regular file")
        fmt = detect_format(path)
        if path.name != MODEL_FILES[fmt]:
            raise RepoError(f"{path} holds a {fmt} model: name it {MODEL_FILES[fmt]}")
        return path, fmt

    def job_source(self, name: str) -> tuple[Path, bytes]:
        path = self.entry_dir("job", name) / JOB_FILE
        return path, self.read_trusted(path, MAX_JOB_BYTES)

    # changes (admins only) ---------------------------------------------------

    def add(self, kind: str, name: str, fd: int, config: dict[str, Any] | None,
            uid: int, gid: int) -> dict[str, Any]:
        """Put the file open at ``fd`` (the client's) into the repository as NAME.

        Returns {"kind", "name", "path", "format", "config"}."""
        check_kind(kind)
        check_name(name, f"{kind} name")
        self.require_admin(uid, gid, f"repo add {kind} {name}")
        cfg = parse_config(kind, config or {}, f"{kind} {name} config")
        self.check_trusted(self.path)
        limit = MAX_MODEL_BYTES if kind == "model" else MAX_JOB_BYTES
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise RepoError(f"repo add {kind} {name}: the file descriptor: {e.strerror}") \
                from None
        if stat.S_ISDIR(st.st_mode):
            raise RepoError(f"repo add {kind} {name}: that is a directory, not a file")
        if stat.S_ISREG(st.st_mode) and st.st_size > limit:
            raise RepoError(f"repo add {kind} {name}: {st.st_size} bytes is more than "
                            f"the {limit >> 20} MiB a {kind} may have")
        d = self.entry_dir(kind, name)
        made = []
        for p in (d.parent, d):                     # models/ or jobs/, then NAME/
            if not p.exists():
                p.mkdir(mode=0o755)
                _own(p, 0o755)
                made.append(p)
        tmp: Path | None = None
        try:
            self.check_trusted(d)     # before writing into it: no link, no stranger's dir
            tmp = _tmp_in(d)
            with os.fdopen(os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                   0o600), "wb") as out:
                _copy_fd(fd, out, limit, f"repo add {kind} {name}")
            fmt = None
            if kind == "model":
                fmt = detect_format(tmp, f"repo add model {name}: the file")
                target = d / MODEL_FILES[fmt]
            else:
                _check_job_source(tmp.read_bytes(), f"{kind} {name}")
                target = d / JOB_FILE
            _own(tmp, 0o644)
            _write_atomic(d / CONFIG_FILE, config_toml(cfg).encode())
            os.replace(tmp, target)
        except BaseException:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            for p in reversed(made):   # leave no empty entry behind
                try:
                    p.rmdir()
                except OSError:
                    pass  # another add filled it meanwhile
            raise
        if kind == "model":
            # the other format's file would make the entry ambiguous
            for other in MODEL_FILES.values():
                if other != target.name:
                    (d / other).unlink(missing_ok=True)
        log.info("repository: %s %s added by uid %d (%s)", kind, name, uid, target)
        return {"kind": kind, "name": name, "path": str(target), "format": fmt,
                "config": config_dict(cfg)}

    def remove(self, kind: str, name: str, uid: int, gid: int) -> None:
        check_kind(kind)
        check_name(name, f"{kind} name")
        self.require_admin(uid, gid, f"repo remove {kind} {name}")
        d = self.entry_dir(kind, name)
        if not os.path.lexists(d):
            raise RepoError(f"no {kind} {name!r} in the repository")
        if os.path.islink(d) or not d.is_dir():
            raise RepoError(f"{d} is not a directory")
        # out of sight first (a scan skips dot names), then deleted
        gone = d.parent / f".{name}.removed-{os.urandom(4).hex()}"
        os.rename(d, gone)
        shutil.rmtree(gone)
        log.info("repository: %s %s removed by uid %d", kind, name, uid)


# ---------------------------------------------------------------- helpers

def _check_job_source(src: bytes, what: str) -> None:
    """Syntax and a top-level ``run`` without executing anything."""
    try:
        tree = ast.parse(src.decode(), filename=JOB_FILE)
    except UnicodeDecodeError as e:
        raise RepoError(f"{what}: job.py is not UTF-8 text: {e}") from None
    except SyntaxError as e:
        raise RepoError(f"{what}: job.py line {e.lineno}: {e.msg}") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "run":
            return
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "run" for t in node.targets):
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name) == "run" for a in node.names):
            return
    raise RepoError(f"{what}: job.py defines no top-level run(ctx)")


def _tmp_in(d: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=".tmp-", dir=d)
    os.close(fd)
    os.unlink(name)   # re-created with O_EXCL by the writer
    return Path(name)


def _own(path: Path, mode: int) -> None:
    """Mode regardless of umask; root's file when laked is root."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        os.chown(path, 0, 0)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = _tmp_in(path.parent)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _own(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_fd(fd: int, limit: int, what: str) -> bytes:
    chunks, n = [], 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            return b"".join(chunks)
        n += len(b)
        if n > limit:
            raise RepoError(f"{what}: larger than {limit >> 10} KiB: refusing to load it")
        chunks.append(b)


def _copy_fd(fd: int, out: Any, limit: int, what: str) -> None:
    n = 0
    while True:
        try:
            b = os.read(fd, 4 << 20)
        except OSError as e:
            raise RepoError(f"{what}: reading the file: {e.strerror}") from None
        if not b:
            break
        n += len(b)
        if n > limit:
            raise RepoError(f"{what}: the file is larger than {limit >> 20} MiB")
        out.write(b)
    if n == 0:
        raise RepoError(f"{what}: the file is empty")
    out.flush()
    os.fsync(out.fileno())
