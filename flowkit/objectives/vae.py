r"""Variational autoencoder with a posterior family chosen by name (Gaussian, planar, IAF, FFJORD).

A latent-variable model ``p(x, z) = p(x | z) p(z)`` with ``p(z) = N(0, I)`` and an MLP
decoder — Bernoulli for binarised data, Gaussian for continuous data — trained by maximising
the evidence lower bound (Kingma & Welling 2014, eq. 3; no β):

.. math:: \mathcal L(x) = \mathbb E_{q(z|x)}\left[\log p(x \mid z) + \log p(z) - \log q(z \mid x)\right]
          \le \log p(x),

estimated with one reparameterised sample per data point. ``log q(z | x)`` comes from the
posterior family (:mod:`flowkit.posteriors`), a flow's log-determinant included; the KL term
is its Monte Carlo estimate ``log q(z | x) − log p(z)`` for every family alike, so the bound is
tight — equal to ``log p(x)`` for *every* sample — when ``q`` is the exact posterior. The loss is
``−L`` in nats per data point; ``recon = −E log p(x|z)``, ``kl`` and ``elbo`` are logged apart.

Evaluation: :meth:`VAE.evaluate_elbo` gives the negative ELBO and the importance-weighted bound
(IWAE, Burda et al. 2016, eq. 8)

.. math:: \mathcal L_k(x) = \mathbb E\left[\log \frac1k \sum_{i=1}^k
          \frac{p(x, z_i)}{q(z_i \mid x)}\right], \quad z_i \sim q(z \mid x),

which increases with ``k`` towards ``log p(x)``; ``−L_k`` is the reported NLL estimate. A VAE
defines no flow over the data (``provides`` is empty, ``defines_density`` false): it is
evaluated through :meth:`~VAE.evaluate_elbo`, :meth:`~VAE.reconstruct` and :meth:`~VAE.generate`
(declared by ``variational = True``), not through :meth:`~VAE.flow`.

References:
    Kingma & Welling (2014). Auto-Encoding Variational Bayes. ICLR.
    Burda, Grosse & Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR.
    Grathwohl et al. (2019). FFJORD, §4.3 and Table 2 (VAE posteriors compared).

Example:
    >>> vae = VAE(None, (1, 8, 8), latent=2, encoder=[16], decoder=[16], posterior=POSTERIORS.build("planar"))
    >>> x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.3))
    >>> out = vae.loss(x)
    >>> sorted(out.metrics)
    ['elbo', 'kl', 'nfe', 'recon']
    >>> res = vae.evaluate_elbo(x, k=4, generator=torch.Generator().manual_seed(0))
    >>> res["iwae_nll"] <= res["neg_elbo"] + 1e-5  # the bound tightens with k
    True
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components import OBJECTIVES
from ..constraints import PositiveFloat, PositiveInt, Rule
from ..flow import FieldError, Flow
from ..posteriors import POSTERIORS, Gaussian, Posterior
from .base import DynamicsFactory, LossOutput, Objective

__all__ = ["VAE"]

_LOG_2PI = math.log(2 * math.pi)

Activation = Literal["elu", "relu", "tanh", "softplus"]
_ACTIVATIONS = {"elu": nn.ELU, "relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus}

decoder_std_needs_gaussian = Rule(
    ("decoder_std", "likelihood"), lambda a: a["decoder_std"] is None or a["likelihood"] == "gaussian",
    "decoder_std is the Gaussian decoder's fixed standard deviation; likelihood {likelihood!r} has none "
    "(remove decoder_std, or set likelihood: gaussian)")


def _mlp(widths: Sequence[int], act: str, out: Optional[int] = None) -> nn.Sequential:
    """Linear layers through ``widths`` with ``act`` after each, then an optional linear ``out``."""
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), _ACTIVATIONS[act]()]
    if out is not None:
        layers.append(nn.Linear(widths[-1], out))
    return nn.Sequential(*layers)


@OBJECTIVES.register("vae")
class VAE(Objective):
    """Variational autoencoder: negative ELBO with a Gaussian, planar, IAF or FFJORD posterior.

    Args:
        dynamics: set by flowkit; unused (the VAE builds its own encoder, decoder and posterior).
        shape: set by flowkit from the data.
        latent: dimension of ``z``.
        encoder: hidden widths of the encoder MLP; its last hidden layer is the features ``h``
            every posterior reads (``[]``: ``h`` is ``x`` itself).
        decoder: hidden widths of the decoder MLP (``[]``: a linear decoder).
        likelihood: ``bernoulli`` (binary data, e.g. ``data.binarize: true``; the decoder gives
            logits) or ``gaussian`` (continuous data; the decoder gives the mean).
        decoder_std: the Gaussian decoder's fixed σ; ``null`` learns one σ per dimension.
        activation: nonlinearity of the encoder and decoder.
        posterior: the posterior family, a :data:`flowkit.posteriors.POSTERIORS` block
            (``{name: gaussian | planar | iaf | ffjord, ...}``; default ``gaussian``).

    Raises:
        ValueError: a width below 1, or ``decoder_std`` with a Bernoulli decoder.
    """

    nested: ClassVar[dict] = {"posterior": POSTERIORS}
    #: a VAE defines no flow over the data: no sampler applies
    provides: ClassVar[frozenset[str]] = frozenset()
    defines_density: ClassVar[bool] = False
    #: evaluated by bounds: evaluate_elbo(x, k), reconstruct(x), generate(n, generator)
    variational: ClassVar[bool] = True
    #: builds its own encoder, decoder and posterior: a recipe has no dynamics section
    needs_dynamics: ClassVar[bool] = False
    argument_rules: ClassVar[tuple[Rule, ...]] = (decoder_std_needs_gaussian,)

    def __init__(self, dynamics: Optional[DynamicsFactory], shape: tuple[int, ...], latent: PositiveInt = 16,
                 encoder: Sequence[PositiveInt] = (256, 256), decoder: Sequence[PositiveInt] = (256, 256),
                 likelihood: Literal["bernoulli", "gaussian"] = "bernoulli",
                 decoder_std: Optional[PositiveFloat] = None, activation: Activation = "elu",
                 posterior: Optional[Posterior] = None) -> None:
        super().__init__(shape)
        for key, value in [("latent", latent), *(("encoder", w) for w in encoder), *(("decoder", w) for w in decoder)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"objective.{key}: widths must be integers >= 1, got {value!r}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"objective.likelihood: must be bernoulli or gaussian, got {likelihood!r}")
        found = decoder_std_needs_gaussian.check({"decoder_std": decoder_std, "likelihood": likelihood})
        if found is not None:
            raise ValueError(f"objective.{found[0]}: {found[1]}")
        if decoder_std is not None and not (math.isfinite(decoder_std) and decoder_std > 0):
            raise ValueError(f"objective.decoder_std: must be a finite number > 0, got {decoder_std!r}")
        if posterior is not None and not isinstance(posterior, Posterior):
            raise ValueError(f"objective.posterior: expected a posterior family ({', '.join(POSTERIORS.names())}), "
                             f"got {type(posterior).__name__}")
        dim = math.prod(self.shape)
        self.dim, self.latent, self.likelihood = dim, latent, likelihood
        self.encoder = _mlp([dim, *encoder], activation)
        context = encoder[-1] if len(encoder) else dim
        self.posterior = (posterior if posterior is not None else Gaussian()).bind(latent, context)
        self.decoder = _mlp([latent, *decoder], activation, out=dim)
        self.decoder_std = decoder_std
        if likelihood == "gaussian" and decoder_std is None:
            self.log_std = nn.Parameter(torch.zeros(dim))

    # ------------------------------------------------------------------ the model
    def flow(self) -> Flow:
        raise FieldError("objective vae defines no flow over the data (a latent-variable model; it provides "
                         "nothing to samplers): evaluate it with evaluate_elbo(x, k) (negative ELBO and IWAE "
                         "bound), reconstruct(x) and generate(n)")

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's features ``h`` ``[B, context]`` of data ``x`` ``[B, *shape]``."""
        return self.encoder(x.reshape(x.shape[0], -1))

    def decode(self, z: Tensor) -> Tensor:
        """Decoder output ``[B, *shape]``: Bernoulli logits or the Gaussian mean."""
        return self.decoder(z).reshape(z.shape[0], *self.shape)

    def log_prior(self, z: Tensor) -> Tensor:
        """``log N(z; 0, I)`` per sample."""
        return (-0.5 * z.pow(2) - 0.5 * _LOG_2PI).sum(-1)

    def log_likelihood(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x | z)`` per sample (``z`` ``[B, latent]``, ``x`` ``[B, *shape]``)."""
        out = self.decode(z).reshape(z.shape[0], -1)
        x = x.reshape(x.shape[0], -1)
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
        log_std = (torch.full_like(out[0], math.log(self.decoder_std)) if self.decoder_std is not None
                   else self.log_std)
        return (-0.5 * ((x - out) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)

    def log_joint(self, x: Tensor, z: Tensor) -> Tensor:
        """``log p(x, z) = log p(x | z) + log p(z)`` per sample."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    def _check_data(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.shape:
            raise FieldError(f"x: expected [batch, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        if self.likelihood == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
            from ..data import DataError

            raise DataError("objective.likelihood: bernoulli needs binary data (every value 0 or 1); set "
                            "data.binarize: true (dynamic binarisation), or objective.likelihood: gaussian for "
                            "continuous data")

    def log_weights(self, x: Tensor, k: int = 1, generator: Optional[torch.Generator] = None) -> Tensor:
        """Importance log-weights ``log p(x, z_i) − log q(z_i | x)``, ``[k, B]``, for ``k`` posterior
        samples per data point: their mean is an ELBO estimate, ``logsumexp − log k`` the IWAE bound."""
        log_px, log_pz, log_q = self._terms(x, k, generator)
        return log_px + log_pz - log_q

    def _terms(self, x: Tensor, k: int, generator: Optional[torch.Generator] = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``log p(x | z_i)``, ``log p(z_i)`` and ``log q(z_i | x)``, each ``[k, B]``, for ``k``
        posterior samples per data point."""
        b = x.shape[0]
        h = self.encode(x)
        eps = torch.randn(k, b, self.latent, generator=generator, dtype=h.dtype, device=h.device)
        z, log_q = self.posterior(h.repeat(k, 1), eps.reshape(k * b, self.latent))
        xs = x.repeat(k, *([1] * (x.dim() - 1)))
        return (self.log_likelihood(xs, z).view(k, b), self.log_prior(z).view(k, b), log_q.view(k, b))

    # ------------------------------------------------------------------ training
    def loss(self, x: Tensor, cond: Optional[Tensor] = None) -> LossOutput:
        """Negative ELBO (nats per data point), one posterior sample each; ``cond`` is unused."""
        self._check_data(x)
        log_px, log_pz, log_q = self._terms(x, 1)
        recon = -log_px.mean()
        kl = (log_q - log_pz).mean()
        neg_elbo = recon + kl
        metrics = {"recon": recon.item(), "kl": kl.item(), "elbo": -neg_elbo.item(),
                   "nfe": float(self.posterior.nfe or 1)}
        return LossOutput(neg_elbo, metrics)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_elbo(self, x: Tensor, k: int = 64, *, batch_size: int = 256,
                      generator: Optional[torch.Generator] = None) -> dict[str, Any]:
        """Negative ELBO and the negative IWAE bound with ``k`` samples, nats per data point.

        Both are means over the data points of ``x`` with their standard errors over data
        points (``*_sem``); ``neg_elbo`` averages ``−log w_i`` over the same ``k`` samples the
        IWAE bound ``iwae_nll = −log (1/k) Σ_i w_i`` uses (``w_i = p(x, z_i) / q(z_i | x)``), so
        ``iwae_nll ≤ neg_elbo`` for every data point. Run it in ``eval()`` mode (a CNF
        posterior then uses its exact trace).

        Returns:
            ``{"neg_elbo", "neg_elbo_sem", "iwae_nll", "iwae_nll_sem", "recon", "kl", "k", "n", "nfe"}``.

        Raises:
            ValueError: ``k`` or ``batch_size`` not an integer ``>= 1``.
            FieldError: ``x`` not ``[n, *shape]`` with ``n >= 1``.
            flowkit.data.DataError: non-binary data for a Bernoulli decoder.
        """
        for key, value in (("k", k), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: must be an integer >= 1, got {value!r}")
        if x.dim() < 1 or x.shape[0] < 1:
            raise FieldError(f"x: expected at least one data point, got shape {tuple(x.shape)}")
        self._check_data(x)
        elbos, iwaes, recons, kls, nfes = [], [], [], [], []
        for i in range(0, x.shape[0], batch_size):
            log_px, log_pz, log_q = self._terms(x[i:i + batch_size], k, generator)
            log_w = (log_px + log_pz - log_q).double()
            elbos.append(log_w.mean(0))
            iwaes.append(torch.logsumexp(log_w, 0) - math.log(k))
            recons.append(-log_px.double().mean(0))
            kls.append((log_q - log_pz).double().mean(0))
            nfes.append(self.posterior.nfe or 1)
        elbo, iwae = torch.cat(elbos), torch.cat(iwaes)
        n = elbo.numel()

        def sem(v: Tensor) -> float:
            return float(v.std() / math.sqrt(n)) if n > 1 else 0.0

        return {"neg_elbo": float(-elbo.mean()), "neg_elbo_sem": sem(elbo), "iwae_nll": float(-iwae.mean()),
                "iwae_nll_sem": sem(iwae), "recon": float(torch.cat(recons).mean()),
                "kl": float(torch.cat(kls).mean()), "k": k, "n": n, "nfe": float(sum(nfes) / len(nfes))}

    def mean(self, z: Tensor) -> Tensor:
        """The decoder's mean ``E[x | z]`` ``[B, *shape]``: Bernoulli probabilities or the Gaussian mean."""
        out = self.decode(z)
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """``E[x | z]`` at the posterior's central point: ``ε = 0`` (``z₀ = μ(x)``) pushed through
        the posterior's flow. Shaped like ``x``."""
        self._check_data(x)
        h = self.encode(x)
        z, _ = self.posterior(h, torch.zeros(x.shape[0], self.latent, dtype=h.dtype, device=h.device))
        return self.mean(z)

    @torch.no_grad()
    def generate(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``E[x | z]`` for ``n`` prior draws ``z ~ N(0, I)`` (``[n, *shape]``; the decoder's mean, which
        is what pictures show — draw ``x ~ p(x | z)`` from it for samples of the data).

        Raises:
            ValueError: ``n`` not an integer ``>= 1``.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {n!r}")
        param = next(self.decoder.parameters())
        device = generator.device if generator is not None else param.device
        z = torch.randn(n, self.latent, generator=generator, dtype=param.dtype, device=device).to(param.device)
        return self.mean(z)
