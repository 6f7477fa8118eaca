"""MongoDB passwords: used to connect, never printed, never written.

A password reaches affseg in one of three ways, first match wins:
1. inside the store URI (`mongodb://user:secret@host/db`): accepted, but
   the master takes it out of the URI at once; its workers get it through
   the environment variable below, which local, SLURM and LSF workers
   inherit;
2. the environment variable `AFFSEG_MONGODB_PASSWORD`;
3. `store_password_file` in the run config: a file readable by its owner
   only (mode 600), whose first line is the password.
Run directories, `layout.json`, logs and messages only ever hold the URI
without it; messages show `user:***@host` where a password was given.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from pipeline.errors import UserError

PASSWORD_ENV = "AFFSEG_MONGODB_PASSWORD"


def split_password(uri: str) -> tuple[str, str | None]:
    """(the URI without its password, the password or None)."""
    parts = urlsplit(uri)
    users, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in users:
        return uri, None
    user, _, password = users.partition(":")
    return urlunsplit(parts._replace(netloc=f"{user}@{hosts}")), unquote(password)


def move_inline_password(uri: str) -> str:
    """A master's first step: a password written into the URI moves into the
    environment (of the master and the workers it starts) and the URI that
    the run directory records goes without it."""
    bare, secret = split_password(uri)
    if secret is not None:
        os.environ[PASSWORD_ENV] = secret
    return bare


def masked(uri: str) -> str:
    """The URI as messages show it: `user:***@host` where it holds a password."""
    bare, password = split_password(uri)
    if password is None:
        return uri
    parts = urlsplit(bare)
    user, _, hosts = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def read_password_file(path: Path) -> str:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise UserError(f"store_password_file: cannot read {path}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UserError(f"store_password_file: {path} is readable by others; chmod 600 it")
    lines = path.read_text().splitlines()
    if not lines or not lines[0]:
        raise UserError(f"store_password_file: {path} is empty")
    return lines[0]


def password(password_file: Path | None) -> str | None:
    """The password for a URI that holds none: the environment, then the file."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    return read_password_file(password_file) if password_file is not None else None


def with_password(uri: str, secret: str | None) -> str:
    """The URI to connect with: the password put back after the user."""
    if secret is None:
        return uri
    parts = urlsplit(uri)
    user, at, hosts = parts.netloc.rpartition("@")
    if not at:
        raise UserError(f"store: a MongoDB password was given but the URI {uri} names no user (user@host)")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(secret, safe='')}@{hosts}"))


def hide_in(text: str, secret: str | None) -> str:
    """`text` with every copy of the password replaced: for messages made by
    other libraries, which may quote the URI."""
    return text if not secret else text.replace(secret, "***").replace(quote(secret, safe=""), "***")
