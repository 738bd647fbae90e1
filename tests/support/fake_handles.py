"""Stand-ins for Serve deployment handles, to test the ingress's plumbing without a cluster."""


class Remote:
    """A Serve handle method's `.remote`: awaitable, or a stream with stream=True."""

    def __init__(self, fn):
        self.remote = fn


class Pool:
    """A deployment handle whose methods are the given functions. `sent` lists each call as
    (method, by_reference): whether it went over Ray's transport (options(_by_reference=True),
    serving/serve_mode.by_reference) rather than Serve's default."""

    def __init__(self, _by_reference=False, _sent=None, /, **methods):
        self._methods, self._by_reference = methods, _by_reference
        self.sent = [] if _sent is None else _sent

    def options(self, stream=False, _by_reference=None):
        if _by_reference is None:
            return self
        return Pool(_by_reference, self.sent, **self._methods)

    def __getattr__(self, name):
        methods = self.__dict__.get("_methods", {})
        if name not in methods:
            raise AttributeError(name)

        def call(*args, **kwargs):
            self.sent.append((name, self._by_reference))
            return methods[name](*args, **kwargs)

        return Remote(call)
