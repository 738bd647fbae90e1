"""Stand-ins for Serve deployment handles, to test the ingress's plumbing without a cluster."""


class Remote:
    """A Serve handle method's `.remote`: awaitable, or a stream with stream=True."""

    def __init__(self, fn):
        self.remote = fn


class Pool:
    """A deployment handle whose methods are the given functions."""

    def __init__(self, **methods):
        for name, fn in methods.items():
            setattr(self, name, Remote(fn))

    def options(self, stream=False):
        return self
