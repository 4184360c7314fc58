"""Exception types.  Every error a user can cause is a :class:`TokoptError`.

The CLI turns a ``TokoptError`` into a one-line message and its ``exit_code``;
anything else is a bug in tokopt (or a plugin) and keeps its traceback.  Readers and
writers of files meet the user's data and machine, so their failures are translated into
:class:`InputFileError` / :class:`OutputLocationError` at one boundary
(:mod:`tokopt.io_boundary`).  An interrupt (SIGINT/SIGTERM) is :class:`Interrupted`, not a
``TokoptError``: it must unwind through every ``except TokoptError`` and clean up on its way.
"""

from __future__ import annotations


class TokoptError(Exception):
    """Base class for errors caused by input the user can fix (exit code 2)."""

    exit_code = 2


class ModelSourceError(TokoptError):
    """The model argument does not name a loadable model (missing path, unknown hub id…)."""


class UnsupportedArchitectureError(TokoptError):
    """The checkpoint's architecture (or one of its features) has no frontend builder."""


class UnsupportedOpError(TokoptError):
    """A backend or executor meets an op, or op attribute, it cannot run faithfully."""


class VerificationError(TokoptError):
    """The graph broke an IR invariant; ``stage`` names the frontend or pass that produced it."""

    exit_code = 3

    def __init__(self, problems: list[str], stage: str = "graph") -> None:
        self.problems = problems
        self.stage = stage
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        super().__init__(f"{stage} produced an invalid graph: {shown}{more}")


class PassOptionError(TokoptError):
    """A pass was given an unknown option or an invalid value (the message lists valid ones)."""


class PreconditionError(TokoptError):
    """A pass cannot apply to this model or pipeline (e.g. expert pruning on a dense model)."""


class BackendUnavailableError(TokoptError):
    """The backend cannot run here (missing package or hardware); the message says which."""


class BackendRefusalError(TokoptError):
    """The backend cannot express something the graph requires (e.g. sinks, a KV dtype)."""


class ParityError(TokoptError):
    """A lowered artifact's logits disagree with the reference executor: nothing is shipped."""

    exit_code = 4


class PluginError(TokoptError):
    """A plugin failed to load or crashed; the message names the plugin."""

    exit_code = 5


class KVCacheFullError(TokoptError):
    """A static KV cache reached its ``max_len``; raise it or use dynamic/paged storage."""


class GateError(TokoptError):
    """A quality or speed gate failed (``--max-ppl-increase`` …); the message says which and by how much."""

    exit_code = 1


class OutputExistsError(TokoptError):
    """The output directory exists already; tokopt never overwrites it unless told to (``--force``)."""


class UsageError(TokoptError):
    """The command was called in a way that cannot work (exit code 2)."""


class RecipeError(PassOptionError):
    """A recipe file or ``--passes`` string is malformed (exit code 2)."""


class CorpusError(TokoptError):
    """Text for evaluation or calibration is missing, too short, or overlaps."""


class PassContractError(PluginError):
    """A pass broke its declared contract (``modified``, ``ensures``, ``moves``, or it changed its input).

    The message names the pass and the plugin that provides it (exit code 5, like every plugin failure).
    """


class InputFileError(ModelSourceError):
    """A file tokopt reads is missing, unreadable, truncated or corrupt; the message names it and what to do."""


class OutputLocationError(TokoptError):
    """OUT cannot be written there: a missing or unwritable parent, a file in the way, no space left."""


class SettingError(UsageError):
    """A ``TOKOPT_*`` environment variable holds a value tokopt cannot use; the message names it."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: unwind (cleaning up) and exit ``128 + signal`` (130 / 143).

    A ``KeyboardInterrupt``, not a :class:`TokoptError`, so no ``except TokoptError`` (or
    ``except Exception``) on the way up can swallow it; ``subprocess.run`` kills its child on it.
    """

    def __init__(self, signum: int, name: str) -> None:
        self.signum = signum
        self.signal_name = name
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {name}")
