"""A float64 NumPy oracle of Adam and its variants, written from the equations, not from adamx.

Kingma & Ba (2014), Algorithm 1 and section 7.1; Loshchilov & Hutter (2019) for decoupled decay;
Reddi et al. (2018) for AMSGrad; Dozat (2016) as optax writes NAdam.
"""

import numpy as np


class ReferenceAdam:
    """Adam on a list of float64 NumPy arrays; ``step`` returns the updates for one step."""

    def __init__(
        self, shapes, *, lr, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=0.0,
        eps_hat=False, maximize=False, nesterov=False, amsgrad=None, adamax=False,
    ):
        self.lr, self.b1, self.b2, self.eps, self.eps_root = lr, b1, b2, eps, eps_root
        self.weight_decay, self.eps_hat, self.maximize = weight_decay, eps_hat, maximize
        self.nesterov, self.amsgrad, self.adamax = nesterov, amsgrad, adamax
        complex_ok = [np.complex128 if s[1] else np.float64 for s in shapes]
        self.m = [np.zeros(s[0], d) for s, d in zip(shapes, complex_ok)]
        self.v = [np.zeros(s[0]) for s in shapes]
        self.v_max = [np.zeros(s[0]) for s in shapes]
        self.t = 0

    def step(self, grads, params):
        self.t += 1
        t, b1, b2 = self.t, self.b1, self.b2
        out = []
        for i, (g, p) in enumerate(zip(grads, params)):
            g = np.asarray(g, np.complex128 if np.iscomplexobj(g) else np.float64)
            if self.maximize:
                g = -g
            self.m[i] = b1 * self.m[i] + (1 - b1) * g
            if self.adamax:
                self.v[i] = np.maximum(b2 * self.v[i], np.abs(g) + self.eps)
                u = self.m[i] / (1 - b1**t) / self.v[i]
                out.append(-self.lr * u)
                continue
            self.v[i] = b2 * self.v[i] + (1 - b2) * np.abs(g) ** 2
            if self.nesterov:
                m_hat = b1 * self.m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            else:
                m_hat = self.m[i] / (1 - b1**t)
            v = self.v[i]
            if self.amsgrad == "raw":
                self.v_max[i] = np.maximum(self.v_max[i], v)
                v = self.v_max[i]
            if self.amsgrad == "corrected":
                self.v_max[i] = np.maximum(self.v_max[i], v / (1 - b2**t))
                v_hat = self.v_max[i]
            else:
                v_hat = v / (1 - b2**t)
            if self.eps_hat:
                u = np.sqrt(1 - b2**t) * m_hat / (np.sqrt(v + self.eps_root) + self.eps)
            else:
                u = m_hat / (np.sqrt(v_hat + self.eps_root) + self.eps)
            u = u + self.weight_decay * np.asarray(p, np.result_type(p, np.float64))
            out.append(-self.lr * u)
        return out


def run_reference(grad_seq, params0, **options):
    """Runs the oracle over a sequence of gradient lists; returns the list of params per step."""
    shapes = [(np.shape(p), np.iscomplexobj(p)) for p in params0]
    opt = ReferenceAdam(shapes, **options)
    params = [np.asarray(p, np.complex128 if np.iscomplexobj(p) else np.float64) for p in params0]
    history = []
    for grads in grad_seq:
        updates = opt.step(grads, params)
        params = [p + u for p, u in zip(params, updates)]
        history.append(params)
    return history
