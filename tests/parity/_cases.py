"""The parity cases: each pairs a peer optimizer with the adamx options that reproduce it.

A case is (peer, build_peer, build_adamx). ``build_peer`` returns what the peer's runner in
``_peers.py`` expects; ``build_adamx`` returns an optax GradientTransformation. Modules are
imported inside the builders, so listing the cases imports nothing.
"""

from ._peers import LR, WD

# Optax cases mask weight decay off two of the four leaves.
MASK = {"scalar": False, "tiny": True, "matrix": True, "tensor": False}


def _torch(name, **kw):
    def build(params):
        import torch

        return getattr(torch.optim, name)(params, **kw)

    return build


def _keras(name, **kw):
    def build():
        from ._peers import import_keras

        return getattr(import_keras().optimizers, name)(**kw)

    return build


def _optax(name, *args, **kw):
    def build():
        import optax

        return getattr(optax, name)(*args, **kw)

    return build


def _adamx(name, *args, **kw):
    def build():
        import adamx

        return getattr(adamx, name)(*args, **kw)

    return build


def _coupled_adam(wd, *args, **kw):
    def build():
        import optax

        import adamx

        return optax.chain(optax.add_decayed_weights(wd), adamx.adam(*args, **kw))

    return build


def _scaled(module_name, name, **kw):
    """``optax.chain(<module>.<name>(**kw), optax.scale(-LR))``: a scale_by_* transformation."""
    def build():
        import importlib

        import optax

        return optax.chain(getattr(importlib.import_module(module_name), name)(**kw),
                           optax.scale(-LR))

    return build


def _schedule_adam(module_name):
    def build():
        import importlib

        import optax

        schedule = optax.exponential_decay(LR, transition_steps=8, decay_rate=0.5)
        return importlib.import_module(module_name).adam(schedule)

    return build


TORCH = {
    "adam": (_torch("Adam", lr=LR), _adamx("adam", LR)),
    "adam_betas_eps": (
        _torch("Adam", lr=LR, betas=(0.8, 0.99), eps=1e-6),
        _adamx("adam", LR, b1=0.8, b2=0.99, eps=1e-6),
    ),
    "adam_amsgrad": (_torch("Adam", lr=LR, amsgrad=True), _adamx("amsgrad", LR)),
    "adam_maximize": (_torch("Adam", lr=LR, maximize=True), _adamx("adam", LR, maximize=True)),
    "adam_amsgrad_maximize": (
        _torch("Adam", lr=LR, amsgrad=True, maximize=True),
        _adamx("amsgrad", LR, maximize=True),
    ),
    "adam_coupled_weight_decay": (
        _torch("Adam", lr=LR, weight_decay=WD),
        _coupled_adam(WD, LR),
    ),
    # torch adds wd * p after negating the gradient, so under maximize the decay term enters
    # adamx (which negates on entry) with the opposite sign.
    "adam_maximize_coupled_weight_decay": (
        _torch("Adam", lr=LR, weight_decay=WD, maximize=True),
        _coupled_adam(-WD, LR, maximize=True),
    ),
    "adamw": (_torch("AdamW", lr=LR, weight_decay=WD), _adamx("adamw", LR, weight_decay=WD)),
    "adamw_maximize": (
        _torch("AdamW", lr=LR, weight_decay=WD, maximize=True),
        _adamx("adamw", LR, weight_decay=WD, maximize=True),
    ),
    "adamw_amsgrad": (
        _torch("AdamW", lr=LR, weight_decay=WD, amsgrad=True),
        _adamx("amsgrad", LR, weight_decay=WD),
    ),
    "adamax": (_torch("Adamax", lr=LR), _adamx("adamax", LR)),
    "adamax_maximize": (
        _torch("Adamax", lr=LR, maximize=True),
        _adamx("adamax", LR, maximize=True),
    ),
}


def _exclude_from_weight_decay(opt):
    opt.exclude_from_weight_decay(var_names=[k for k, decayed in MASK.items() if not decayed])


KERAS = {
    "adam": (_keras("Adam", learning_rate=LR), _adamx("adam", LR, eps=1e-7, eps_hat=True)),
    "adam_betas_eps": (
        _keras("Adam", learning_rate=LR, beta_1=0.8, beta_2=0.99, epsilon=1e-5),
        _adamx("adam", LR, b1=0.8, b2=0.99, eps=1e-5, eps_hat=True),
    ),
    "adam_amsgrad": (
        _keras("Adam", learning_rate=LR, amsgrad=True),
        _adamx("amsgrad", LR, eps=1e-7, eps_hat=True),
    ),
    "adamw": (
        _keras("AdamW", learning_rate=LR, weight_decay=WD),
        _adamx("adamw", LR, eps=1e-7, eps_hat=True, weight_decay=WD),
    ),
    "adamw_exclude": (
        _keras("AdamW", learning_rate=LR, weight_decay=WD),
        _adamx("adamw", LR, eps=1e-7, eps_hat=True, weight_decay=WD, mask=MASK),
    ),
    "adamw_amsgrad": (
        _keras("AdamW", learning_rate=LR, weight_decay=WD, amsgrad=True),
        _adamx("amsgrad", LR, eps=1e-7, eps_hat=True, weight_decay=WD),
    ),
}

# Configuration applied to a Keras optimizer before it is built (Keras's weight-decay mask).
KERAS_PREPARE = {"adamw_exclude": _exclude_from_weight_decay}

OPTAX = {
    "adam": (_optax("adam", LR), _adamx("adam", LR)),
    "adam_betas_eps_root": (
        _optax("adam", LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-12),
        _adamx("adam", LR, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-12),
    ),
    "adam_schedule": (_schedule_adam("optax"), _schedule_adam("adamx")),
    "adamw_mask": (
        _optax("adamw", LR, weight_decay=WD, mask=MASK),
        _adamx("adamw", LR, weight_decay=WD, mask=MASK),
    ),
    "amsgrad": (_optax("amsgrad", LR), _adamx("amsgrad", LR, max_bias_corrected=True)),
    "nadam": (_optax("nadam", LR), _adamx("nadam", LR)),
    "nadamw_mask": (
        _optax("nadamw", LR, weight_decay=WD, mask=MASK),
        _adamx("nadamw", LR, weight_decay=WD, mask=MASK),
    ),
    "adamax": (_optax("adamax", LR), _adamx("adamax", LR)),
    "adamaxw_mask": (
        _optax("adamaxw", LR, weight_decay=WD, mask=MASK),
        _adamx("adamaxw", LR, weight_decay=WD, mask=MASK),
    ),
    "amsgrad_without_bias_correction": (
        _optax("amsgrad", LR, bias_correction_mu=False, bias_correction_nu=False),
        _adamx("amsgrad", LR, max_bias_corrected=True, bias_correction_mu=False,
               bias_correction_nu=False),
    ),
    "scale_by_amsgrad": (_scaled("optax", "scale_by_amsgrad"),
                         _scaled("adamx", "scale_by_amsgrad", max_bias_corrected=True)),
    "scale_by_adamax": (_scaled("optax", "scale_by_adamax"), _scaled("adamx", "scale_by_adamax")),
}

# The cases also run in float64 (one per convention; every case runs in float32).
FLOAT64 = {
    "torch": ("adam", "adam_amsgrad", "adam_coupled_weight_decay", "adamw", "adamax"),
    "keras": ("adam", "adam_amsgrad", "adamw"),
    "optax": ("adamw_mask", "amsgrad", "nadam", "adamax", "adamaxw_mask",
              "amsgrad_without_bias_correction", "scale_by_amsgrad", "scale_by_adamax"),
}

PEERS = {"optax": OPTAX, "torch": TORCH, "keras": KERAS}


def run_case(peer, case, params, grads):
    """``(the peer's trajectory, adamx's)`` for one case, on the same initial params and grads."""
    from ._peers import run_keras, run_optax, run_torch

    build_peer, build_adamx = PEERS[peer][case]
    if peer == "torch":
        expected = run_torch(build_peer, params, grads)
    elif peer == "keras":
        expected = run_keras(build_peer, params, grads, prepare=KERAS_PREPARE.get(case))
    else:
        expected = run_optax(build_peer(), params, grads)
    return expected, run_optax(build_adamx(), params, grads)
