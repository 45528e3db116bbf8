"""Walking a jaxpr for the tests that check what a program is made of."""


def equations(jaxpr, into_custom_vjp: bool = True):
    """Every equation of a jaxpr and of its nested jaxprs (scan and remat bodies, pjit calls, ...); with
    `into_custom_vjp=False` a custom-VJP call is listed but its inner forward is not entered."""
    for eqn in jaxpr.eqns:
        yield eqn
        if not into_custom_vjp and eqn.primitive.name.startswith("custom_vjp"):
            continue
        for value in eqn.params.values():
            for inner in (value if isinstance(value, (list, tuple)) else [value]):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from equations(inner, into_custom_vjp)
