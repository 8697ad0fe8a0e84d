# Errors and argument checks: _raise_errno, the one errno -> OSError, and the
# checks of an fd, a count and an idle_timeout.

cdef int _raise_errno(int err) except -1:
    if err == ERR_SAME_FILE:
        raise OSError(EINVAL, "src and dst are the same file: the copy would read what it wrote")
    # OSError(errno, msg) picks the subclass (BrokenPipeError, ...) itself.
    raise OSError(err, _os.strerror(err))


cdef object _check_fd(object fd, str name):
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name} must be an int file descriptor, not {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"{name} must be a non-negative file descriptor, got {fd}")
    if fd > 0x7FFFFFFF:
        raise ValueError(f"{name} is out of range: {fd}")
    return fd


cdef long long _check_count(object count) except -2:
    if count is None:
        return -1
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int or None, not {type(count).__name__}")
    if count < 0:
        raise ValueError(f"count must be non-negative, got {count}")
    if count > 0x7FFFFFFFFFFFFFFF:
        # Said at once rather than wrapped into a short (or negative) copy.
        raise ValueError(f"count is out of range (at most 2**63-1): {count}")
    return count


cdef long long _check_idle_timeout(object seconds) except -2:
    if seconds is None:
        return -1
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"idle_timeout must be a number or None, not {type(seconds).__name__}")
    if not seconds > 0:
        raise ValueError(f"idle_timeout must be greater than 0, got {seconds}")
    if seconds > 1e9:
        return -1
    # Round up: a timeout must never fire early.
    return <long long>(seconds * 1000.0 + 0.999)
