"""The one error type a user should ever see.

Anything the user can fix (a config key, a path, a dtype, an unreachable
server) is raised as `UserError` with one line that names the field and the
reason; `pipeline.cli.cli_main` prints it and exits with code 2.
"""

from __future__ import annotations

import pydantic

EXIT_USAGE = 2
# a run (or evaluation) whose blocks did not all finish
EXIT_FAILED = 1


class UserError(Exception):
    """A problem with the user's config or data, described in one line."""


class RunFailed(Exception):
    """A run (or evaluation) that stopped for a reason a re-run of the same
    command gets past: blocks that did not finish, a store that stopped
    answering. The command says so in one line and exits with EXIT_FAILED."""


class StoreLost(RunFailed):
    """A graph store that answered the run before and does not now (a
    restarted server, a network outage): the run fails and its re-run
    resumes, where a store never reached is a UserError (a wrong URI)."""


def describe_validation_error(error: pydantic.ValidationError, source: str = "config") -> str:
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    else:
        reason = first["msg"].removeprefix("Value error, ")
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    # checks across several keys name their keys in the reason
    return f"{source}: {field + ': ' if field else ''}{reason}{suffix}"
