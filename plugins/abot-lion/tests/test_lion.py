import abot  # noqa: F401
import mlx.core as mx
import numpy as np

from abot_lion import lion


def test_one_step_matches_hand_computation():
    p = {"w": mx.array([[1.0, -2.0], [0.5, 0.0]]), "b": mx.array([0.3, -0.3])}
    g = {"w": mx.array([[0.1, 0.2], [-0.3, 0.0]]), "b": mx.array([-1.0, 2.0])}
    opt = lion(weight_decay=0.1, b1=0.9, b2=0.99)
    state = opt.init(p)
    new, state = opt.update(g, state, p, mx.array(0.01))
    # m starts at 0: the step is sign((1 - b1) g); decay only on the matrix.
    w, gw = np.array(p["w"]), np.array(g["w"])
    np.testing.assert_allclose(np.array(new["w"]), w - 0.01 * (np.sign(0.1 * gw) + 0.1 * w), rtol=1e-6)
    np.testing.assert_allclose(np.array(new["b"]), np.array(p["b"]) - 0.01 * np.sign(np.array(g["b"])), rtol=1e-6)
    np.testing.assert_allclose(np.array(state["m"]["b"]), 0.01 * np.array(g["b"]), rtol=1e-6)
