"""The project's error types. Each is a mistake a user can fix from its message alone, so the command line
prints it as one line (exit status 2) instead of a traceback; anything else is a bug and keeps its traceback.

They also subclass ValueError, which is what they are: a value (a file, a flag, a request) that cannot be used.
`one_line` is how any error is shown in that one line.
"""


class LlamaDistError(Exception):
    """Base of the errors a user can fix from the message alone."""


class ConfigError(LlamaDistError, ValueError):
    """A model configuration or run setting that cannot run (bad params.json, a world size the shapes do not
    divide, a bad dtype or timeout)."""


class CheckpointError(LlamaDistError, ValueError):
    """A checkpoint that is missing, malformed, or cannot be split over this world size."""


class TokenizerError(LlamaDistError, ValueError):
    """A tokenizer file that cannot be read, or text it cannot encode."""


class RequestError(LlamaDistError, ValueError):
    """A generation request that cannot be served (bad prompts or sampling settings)."""


class PromptTooLongError(RequestError):
    """A prompt (or a chat's whole dialog so far) longer than max_seq_len."""


class DialogError(LlamaDistError, ValueError):
    """A dialog the chat format cannot express (bad role, order, or content)."""


class StartupError(ConfigError):
    """The ranks could not meet: the rendezvous port is busy or held by another job, or rank 0's address did not
    answer within the timeout. Raised on the rank that saw it (there is no group yet to share it over)."""


def one_line(exc: BaseException, first: bool = False) -> str:
    """The exception's message on one line (only its first line if `first`: a C++ error's trace follows it), or
    its type's name when it has none; never raises (an exception's __str__ may)."""
    try:
        lines = str(exc).strip().splitlines()
        text = (lines[0] if first else " ".join(lines)).strip() if lines else ""
    except Exception:  # noqa: BLE001 - an exception whose __str__ fails
        text = ""
    return text or type(exc).__name__
