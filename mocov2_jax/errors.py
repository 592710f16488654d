"""The kinds of failure a user can act on. Modules raise these; only `cli` turns them into one
line and an exit code (README, 'Long runs'), so the library never exits a process."""
import errno
import os


class BadInput(ValueError):
  """The command, its config, its data or its workdir cannot work as given; nothing was lost."""


class CannotWrite(OSError):
  """The workdir could not be written (disk full, quota, permissions, read-only); what was
  saved before is intact, and the same command resumes once the cause is fixed."""


# OSErrors that say the storage, not the program, is at fault.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def storage_cause(exc: BaseException):
  """The first OSError with a storage errno in `exc`'s chain (cause, context), or None: orbax
  and TensorStore wrap the OS's error in their own."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
      return exc
    text = str(exc)
    for code in STORAGE_ERRNOS:   # TensorStore reports errno only as text
      if os.strerror(code) in text:
        return OSError(code, os.strerror(code))
    exc = exc.__cause__ or exc.__context__
  return None
