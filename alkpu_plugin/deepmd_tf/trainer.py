"""RLEKF training for DeePMD-kit's TensorFlow backend (the paper's Algorithm 5).

:class:`RLEKFTrainer` is DeePMD-kit's own ``DPTrainer`` with the Adam step
replaced: the model, descriptor, data, loss (used for the lcurve display),
checkpoints and ``dp freeze`` are DeePMD-kit's.  What changes:

* the graph gets, instead of Adam's ``minimize``, the scalarised measurements
  of RLEKF (:mod:`alkpu_plugin.kalman.rlekf`) and their gradients with respect
  to all trainable weights, flattened in the Kalman layout, plus one op that
  adds a flat increment to the weights;
* the training loop makes, per batch, one energy update and ``force_updates``
  force updates, each on a fresh forward pass over ``atoms_per_update`` newly
  drawn atoms; the Kalman filter itself runs in NumPy/BLAS
  (:class:`alkpu_plugin.kalman.KalmanFilter`);
* every checkpoint ``model.ckpt-<step>`` gets ``model.ckpt-<step>.kalman.npz``
  (P blocks, lambda, update count, layout fingerprint, digest of the weights,
  and the states of the batch and atom random generators), with the link
  ``model.ckpt.kalman.npz`` to the newest; ``dp train --restart`` and
  ``--init-model`` continue from it.

Batches are drawn by this module's own seeded sampler (not DeePMD-kit's
``get_batch``) so that a restart continues the same batch sequence: N steps +
restart + N steps equals 2N steps.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from deepmd.tf.env import tf
from deepmd.tf.train.trainer import DPTrainer
from deepmd.tf.utils.sess import run_sess

from ..domain import merge_domains, training_domain
from ..kalman import BlockLayout, FilterOptions, KalmanFilter, load_state, save_state
from ..kalman import KalmanStateError, budget, read_meta, rlekf
from .schema import RLEKFSettings
from .statefiles import STATE_SUFFIX, state_path_for_checkpoint, weights_digest

# a child of DeePMD-kit's logger, so `dp train` shows our lines in its log
log = logging.getLogger("deepmd.alkpu_rlekf")

__all__ = ["RLEKFTrainer", "RLEKFInputError", "BatchSampler"]

#: a force RMSE at or above this share of the label forces' RMS means the forces are not
#: learned yet (RLEKF's initial plateau: predicted forces near zero)
PLATEAU_RATIO = 0.8

_ADAM_PLACEHOLDER = {"type": "Adam", "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.0}


def _sign(x):
    """+1 where x >= 0, -1 where x < 0 (as :func:`alkpu_plugin.kalman.rlekf.signs`)."""
    return 1.0 - 2.0 * tf.cast(x < 0, x.dtype)


def _used_variables(variables, energy):
    """The trainable variables the energy depends on, in model order.

    DeePMD-kit creates some variables it never uses (with ``resnet_dt`` the
    ``idt`` of an embedding layer whose width neither stays nor doubles);
    ``dp freeze`` drops them. They carry no information for the filter, so the
    Kalman layout leaves them out and always names exactly the weights of the
    frozen model.
    """
    grads = tf.gradients(tf.reduce_sum(energy), variables)
    unused = [v.op.name for v, g in zip(variables, grads) if g is None]
    if unused:
        log.info("RLEKF: %d variable(s) the energy does not depend on stay out of the Kalman "
                 "filter: %s", len(unused), ", ".join(unused))
    return [v for v, g in zip(variables, grads) if g is not None]


class RLEKFInputError(RuntimeError):
    """The training input or the files it names cannot be used with RLEKF."""


class BatchSampler:
    """Seeded batches from a ``DeepmdDataSystem``, with a saveable state.

    A system is drawn with the data system's ``sys_probs``; its frames are
    visited in a random order, epoch after epoch, ``batch_size`` at a time.
    """

    def __init__(self, data, seed: int | None) -> None:
        self.data = data
        self.rng = np.random.default_rng(None if seed is None else [int(seed), 0])
        self.frames = []
        for sys in data.data_systems:
            if sys.mixed_type:
                raise RLEKFInputError("RLEKF does not support mixed-type data systems yet")
            sys._load_test_set(False)  # every frame of every set, unshuffled
            self.frames.append(sys.test_set)
        self.nframes = [int(f["coord"].shape[0]) for f in self.frames]
        self.order: list[list[int]] = [[] for _ in self.frames]

    def next(self) -> tuple[int, dict]:
        i = int(self.rng.choice(len(self.frames), p=self.data.sys_probs))
        bs = int(self.data.batch_size[i])
        if len(self.order[i]) < bs:
            self.order[i] += self.rng.permutation(self.nframes[i]).tolist()
        idx = np.asarray(self.order[i][:bs], dtype=np.int64)
        del self.order[i][:bs]
        batch = self.data.data_systems[i]._get_subdata(self.frames[i], idx)
        batch["natoms_vec"] = self.data.natoms_vec[i]
        batch["default_mesh"] = self.data.default_mesh[i]
        return i, batch

    def state(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "order": self.order}

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.order = [list(o) for o in state["order"]]


class RLEKFTrainer(DPTrainer):
    """DeePMD-kit's TF trainer with the RLEKF optimizer."""

    # ------------------------------------------------------------ set-up
    def _init_param(self, jdata: dict) -> None:
        optimizer = dict(jdata.get("optimizer") or {})
        self.rlekf = RLEKFSettings.from_optimizer(optimizer)
        if self.rlekf.seed is None:
            self.rlekf = replace(self.rlekf, seed=jdata["training"].get("seed"))
        # blocksize "auto" is resolved in _build_training from the model's
        # weights; until then the layout uses the default blocksize
        self.kf_auto_blocksize = self.rlekf.blocksize == "auto"
        if self.kf_auto_blocksize:
            self.rlekf = replace(self.rlekf, blocksize=budget.AUTO_BLOCKSIZE_MAX)
        # DeePMD-kit's parser knows Adam only; it reads the Adam keys and we
        # then take over the optimizer
        super()._init_param({**jdata, "optimizer": dict(_ADAM_PLACEHOLDER)})
        self.optimizer_type = "RLEKF"
        if self.mixed_prec is not None:
            raise RLEKFInputError("RLEKF does not support training/mixed_precision; remove it")
        if self.change_bias_after_training:
            raise RLEKFInputError("RLEKF does not support training/change_bias_after_training; remove it")
        if jdata["model"].get("modifier") is not None:
            raise RLEKFInputError("RLEKF does not support model/modifier; remove it")
        if self.run_opt.is_distrib:
            raise RLEKFInputError(
                "RLEKF runs in a single process; distributed (Horovod) training is not supported"
            )
        if self.run_opt.init_mode not in ("init_from_scratch", "restart", "init_from_model"):
            raise RLEKFInputError(
                f"RLEKF supports training from scratch, --restart and --init-model; "
                f"not {self.run_opt.init_mode}"
            )

    def _build_training(self) -> None:
        if self.stop_batch == 0:
            self.train_op = None
            return
        pred = self.model_pred
        if "energy" not in pred or "force" not in pred:
            raise RLEKFInputError("RLEKF trains energy models (energy and force predictions) only")
        f64 = tf.float64
        variables = _used_variables(tf.trainable_variables(), pred["energy"])
        self.kf_vars = variables
        self.kf_layout = BlockLayout.build(
            [(v.op.name, v.shape.as_list()) for v in variables], self.rlekf.blocksize
        )
        # P's memory budget, before any P exists: "auto" picks the blocksize
        # (that of the Kalman state being continued, if any) and p_dtype (by
        # P's size, or the continued state's), then P must fit p_memory_limit
        tensors = list(zip(self.kf_layout.names, self.kf_layout.shapes))
        blocksize = "auto" if self.kf_auto_blocksize else self.rlekf.blocksize
        p_dtype = self.rlekf.p_dtype
        prefix = {"restart": self.run_opt.restart, "init_from_model": self.run_opt.init_model}.get(
            self.run_opt.init_mode
        )
        if prefix is not None and not self.rlekf.reset_state:
            state = (
                Path(self.rlekf.init_state)
                if self.run_opt.init_mode == "init_from_model" and self.rlekf.init_state
                else state_path_for_checkpoint(prefix)
            )
            try:
                meta = read_meta(state)
            except KalmanStateError:
                meta = None  # _open_filter names the problem
            if meta is not None:
                p_dtype = meta["options"].get("p_dtype", p_dtype)
                if blocksize == "auto":
                    blocksize = int(meta["layout"]["blocksize"])
                    log.info('blocksize "auto": %d, that of the Kalman state %s', blocksize, state)
        try:
            plan = budget.plan_p(
                tensors, blocksize, p_dtype, self.rlekf.p_memory_limit, self.rlekf.force_updates,
                model="this model",
            )
        except budget.PMemoryError as exc:
            raise RLEKFInputError(str(exc)) from None
        if plan.blocksize != self.rlekf.blocksize:
            self.rlekf = replace(self.rlekf, blocksize=plan.blocksize)
            self.kf_layout = BlockLayout.build(tensors, plan.blocksize)
        if self.rlekf.kalman_lambda == "auto":
            lam1 = rlekf.auto_lambda1(self.kf_layout.n)
            self.rlekf = replace(self.rlekf, kalman_lambda=lam1)
            log.info('RLEKF kalman_lambda "auto": %g (%d weights)', lam1, self.kf_layout.n)
        if self.rlekf.p_dtype == "auto":
            # "auto" resolved by P's size (or the continued state's type); an explicit
            # type stays as asked, and a continued state of another type is reported
            self.rlekf = replace(self.rlekf, p_dtype=plan.p_dtype)
        log.info("RLEKF %s", plan.describe())

        def flat_grad(z):
            grads = tf.gradients(z, variables)
            return tf.concat(
                [
                    tf.reshape(tf.cast(g if g is not None else tf.zeros_like(v), f64), [-1])
                    for g, v in zip(grads, variables)
                ],
                axis=0,
            )

        with tf.name_scope("alkpu_rlekf"):
            natoms = tf.cast(self.place_holders["natoms_vec"][0], f64)
            energy = tf.reshape(tf.cast(pred["energy"], f64), [-1])
            nframes = tf.shape(energy)[0]
            energy_label = tf.reshape(tf.cast(self.place_holders["energy"], f64), [-1])
            # energy measurement: z = sum s p E / N
            pe = self.rlekf.pref_e
            s_e = tf.stop_gradient(_sign(energy_label - energy))
            self.kf_energy = energy
            self.kf_energy_H = flat_grad(tf.reduce_sum(s_e * pe * energy) / natoms)
            # force measurement over the atoms in kf_atoms: z = sum s p F / c_g, c_g = 3 n_g N
            # (force_normaliser "natoms") or 3 n_g ("none")
            ng = self.rlekf.atoms_per_update
            self.kf_atoms = tf.placeholder(tf.int32, [None, ng], name="atoms")
            force = tf.reshape(tf.cast(pred["force"], f64), [nframes, -1, 3])
            force_label = tf.reshape(tf.cast(self.place_holders["force"], f64), [nframes, -1, 3])
            f_sel = tf.gather(force, self.kf_atoms, axis=1, batch_dims=1)
            f_lab = tf.gather(force_label, self.kf_atoms, axis=1, batch_dims=1)
            pf = self.rlekf.pref_f
            s_f = tf.stop_gradient(_sign(f_lab - f_sel))
            self.kf_force = f_sel
            self.kf_force_label = f_lab
            per_natoms = self.rlekf.force_normaliser == "natoms"
            c_g = 3.0 * ng * natoms if per_natoms else 3.0 * ng
            self.kf_force_H = flat_grad(tf.reduce_sum(s_f * pf * f_sel) / c_g)
            # w += delta (flat, float64)
            self.kf_delta = tf.placeholder(f64, [self.kf_layout.n], name="delta")
            pieces = tf.split(self.kf_delta, list(self.kf_layout.sizes))
            assigns = [
                tf.assign_add(v, tf.cast(tf.reshape(d, v.shape), v.dtype))
                for v, d in zip(variables, pieces)
            ]
            self.kf_apply = tf.group(*assigns)
            self.kf_step = tf.assign_add(self.global_step, 1)
        self.train_op = None
        log.info(
            "built RLEKF training: %d weights in %d blocks (blocksize %d), P %.1f MB in %s",
            self.kf_layout.n,
            len(self.kf_layout.blocks),
            self.rlekf.blocksize,
            self.kf_layout.nbytes_p * np.dtype(self.rlekf.p_dtype).itemsize / 1e6,
            self.rlekf.p_dtype,
        )

    # --------------------------------------------------------- Kalman state
    def _filter_options(self) -> FilterOptions:
        s = self.rlekf
        return FilterOptions(lambda1=s.kalman_lambda, nu=s.kalman_nue, p0=s.p0, p_dtype=s.p_dtype)

    def _checkpoint_weights(self, prefix: str) -> np.ndarray:
        reader = tf.train.load_checkpoint(prefix)
        return self.kf_layout.pack([reader.get_tensor(name) for name in self.kf_layout.names])

    def _open_filter(self) -> tuple[KalmanFilter, dict]:
        """The filter to train with; checked before any file is written."""
        mode = self.run_opt.init_mode
        prefix = {"restart": self.run_opt.restart, "init_from_model": self.run_opt.init_model}.get(mode)
        if prefix is None or self.rlekf.reset_state:
            if prefix is not None:
                log.info("reset_state: starting a fresh Kalman filter from the weights of %s", prefix)
            return KalmanFilter(self.kf_layout, self._filter_options()), {}
        if mode == "init_from_model" and self.rlekf.init_state is not None:
            path = Path(self.rlekf.init_state)
            if not path.exists():
                raise RLEKFInputError(f"optimizer/init_state {path} does not exist")
        else:
            path = state_path_for_checkpoint(prefix)
        if not path.exists():
            raise RLEKFInputError(
                f"no Kalman state for checkpoint {prefix}: expected {path}. RLEKF continues "
                "from the state saved with the checkpoint; to start a fresh filter from "
                'these weights set "reset_state": true in the optimizer section.'
            )
        kf, extra = load_state(path, self.kf_layout)
        saved = extra.get("weights_sha256")
        if saved is not None and saved != weights_digest(self._checkpoint_weights(prefix)):
            raise RLEKFInputError(
                f"Kalman state {path} was saved with other weights than checkpoint {prefix}; "
                "use the state written with this checkpoint, or set \"reset_state\": true."
            )
        if kf.options.p_dtype != self.rlekf.p_dtype:
            log.warning("continuing a %s Kalman state (input asks %s)", kf.options.p_dtype, self.rlekf.p_dtype)
        log.info("continuing Kalman state %s (%d updates, lambda %.6f)", path, kf.nupdates, kf.lam)
        return kf, extra

    def save_checkpoint(self, cur_batch: int) -> None:
        base = Path(os.getcwd()) / self.save_ckpt
        state = base.with_name(f"{base.name}-{cur_batch}{STATE_SUFFIX}")
        flat = self.kf_layout.pack(run_sess(self.sess, self.kf_vars))
        extra = {
            "step": int(cur_batch),
            "weights_sha256": weights_digest(flat),
            "sampler": self.kf_sampler.state(),
            "atom_rng": self.kf_atom_rng.bit_generator.state,
            "settings": self.rlekf.to_dict(),
            "type_map": list(self.type_map or []),
            "domain": self.kf_domain,
            "force_fit": getattr(self, "kf_force_fit", None),
        }
        # state first: a checkpoint never points at a state that is not there
        save_state(state, self.kf, extra)
        super().save_checkpoint(cur_batch)
        link = base.with_name(base.name + STATE_SUFFIX)
        tmp = link.with_name(link.name + ".tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(state.name)
        os.replace(tmp, link)
        self._prune_states(base)

    def _prune_states(self, base: Path) -> None:
        """Keep the states of the checkpoints DeePMD-kit keeps (max_ckpt_keep)."""
        if self.saver is None:
            return
        kept = {Path(p).name + STATE_SUFFIX for p in self.saver.last_checkpoints}
        for path in base.parent.glob(f"{base.name}-*{STATE_SUFFIX}"):
            if path.name not in kept:
                path.unlink()

    # -------------------------------------------------------------- training
    def train(self, train_data=None, valid_data=None) -> None:
        kf, extra = self._open_filter()  # before anything is written
        self.kf = kf
        self.kf_sampler = BatchSampler(train_data, self.rlekf.seed)
        self.kf_trace = os.environ.get("ALKPU_RLEKF_TRACE")  # a file for the per-update trace (_update)
        # the range of the training cells' densities, kept with the state for KPU's domain check:
        # a restart continues the same training, whose data the saved domain already holds
        this_data = training_domain((int(sys.natoms), f.get("box"), not sys.pbc)
                                    for sys, f in zip(train_data.data_systems, self.kf_sampler.frames))
        if self.run_opt.init_mode == "restart" and extra.get("domain"):
            self.kf_domain = extra["domain"]
        else:
            self.kf_domain = merge_domains(
                extra.get("domain") if self.run_opt.init_mode != "init_from_scratch" else None, this_data)
        seed = self.rlekf.seed
        self.kf_atom_rng = np.random.default_rng(None if seed is None else [int(seed), 1])
        self._init_session()
        if self.run_opt.init_mode == "restart" and "sampler" in extra:
            self.kf_sampler.restore(extra["sampler"])
            self.kf_atom_rng.bit_generator.state = extra["atom_rng"]

        fp = open(self.disp_file, "a") if self.run_opt.is_chief else None
        cur_batch = int(run_sess(self.sess, self.global_step))
        self.cur_batch = cur_batch
        start_batch = cur_batch
        log.info(
            "start RLEKF training at step %d: lambda %.6f, %d updates so far",
            cur_batch, kf.lam, kf.nupdates,
        )
        first = True
        step_time = 0.0
        timed_steps = 0
        self.kf_timing = {"graph": 0.0, "kalman": 0.0}
        wall_tic = time.time()
        try:
            while cur_batch < self.stop_batch:
                _, batch = self.kf_sampler.next()
                if self.display_in_training and first:
                    self._display(fp, batch, valid_data, header=True)
                    first = False
                tic = time.time()
                self._train_step(batch)
                cur_batch += 1
                self.cur_batch = cur_batch
                step_time += time.time() - tic
                timed_steps += 1
                if self.display_in_training and cur_batch % self.disp_freq == 0:
                    self._display(fp, batch, valid_data)
                    per = max(timed_steps, 1)
                    log.info(
                        "batch %7d: %.4f s/batch (TF passes %.4f s, Kalman updates %.4f s), wall %.2f s",
                        cur_batch, step_time / per, self.kf_timing["graph"] / per,
                        self.kf_timing["kalman"] / per, time.time() - wall_tic,
                    )
                    step_time, timed_steps, wall_tic = 0.0, 0, time.time()
                    self.kf_timing = {"graph": 0.0, "kalman": 0.0}
                if cur_batch == self.stop_batch and self.run_opt.is_chief and (
                        not self.display_in_training or cur_batch % self.disp_freq):
                    # the last step wrote no lcurve line: the plateau check still sees it
                    self._check_force_fit([batch], self._valid_batches(valid_data))
                if self.save_freq > 0 and cur_batch % self.save_freq == 0 and self.saver is not None:
                    self.save_checkpoint(cur_batch)
            if (
                self.save_freq == 0 or cur_batch == 0 or cur_batch % self.save_freq != 0
            ) and self.saver is not None:
                self.save_checkpoint(cur_batch)
        finally:
            if fp is not None:
                fp.close()
        log.info("RLEKF trained %d steps (%d Kalman updates in all)", cur_batch - start_batch, kf.nupdates)
        fit = getattr(self, "kf_force_fit", None)
        if fit and not fit["learned"]:
            log.warning(
                "RLEKF stopped on its plateau: the %s force RMSE %.4g eV/A is %.2f x the RMS of the "
                "label forces (%.4g eV/A), the model has learned (almost) no forces yet; train "
                "longer (training/numb_steps) before using it%s (a larger optimizer/p0 shortens the "
                "plateau but makes KPU rank frames worse: docs/rlekf.md)", fit["on"], fit["force_rmse"],
                fit["ratio"], fit["label_force_rms"],
                ', or set optimizer/force_normaliser "none" (the default), with which forces are '
                "learnt hundreds of steps sooner" if self.rlekf.force_normaliser == "natoms" else "")

    def _valid_batches(self, valid_data):
        if valid_data is None:
            return None
        return [valid_data.get_batch() for _ in range(self.valid_numb_batch)]

    def _display(self, fp, batch: dict, valid_data, header: bool = False) -> None:
        if not self.run_opt.is_chief:
            return
        self.valid_on_the_fly(fp, [batch], self._valid_batches(valid_data), print_header=header)

    def valid_on_the_fly(self, fp, train_batches, valid_batches, print_header=False, fitting_key=None):
        # every lcurve line also updates the plateau check, from the same evaluations
        self._kf_evaluated = []
        super().valid_on_the_fly(fp, train_batches, valid_batches, print_header, fitting_key)
        self._record_force_fit(self._kf_evaluated, valid_batches)

    def get_evaluation_results(self, batch_list: list) -> dict:
        results = super().get_evaluation_results(batch_list)
        if hasattr(self, "_kf_evaluated"):
            self._kf_evaluated.append((batch_list, results))
        return results

    def _check_force_fit(self, train_batches: list, valid_batches: list | None) -> None:
        """The plateau check at a step that wrote no lcurve line (the last one)."""
        self._kf_evaluated = []
        for batches in (train_batches, valid_batches):
            if batches:
                self.get_evaluation_results(batches)
        self._record_force_fit(self._kf_evaluated, valid_batches)

    def _record_force_fit(self, evaluated: list, valid_batches: list | None) -> None:
        """Force RMSE against the RMS of the label forces on the same frames.

        A model on RLEKF's initial plateau predicts forces near zero, so its force RMSE
        is close to the labels' RMS; below ``PLATEAU_RATIO`` of it, forces are learned.
        The validation frames decide when there are any, else the training batch.
        """
        for batches, results in reversed(evaluated):
            if not results:  # no validation data (DP-GEN's training inputs have none): None
                continue
            rmse = results.get("rmse_f")
            labels = [np.asarray(b["force"], dtype=np.float64).ravel() for b in batches
                      if "force" in b and float(np.max(b.get("find_force", 1.0))) > 0]
            if rmse is None or not labels or not np.isfinite(rmse):
                continue
            rms = float(np.sqrt(np.mean(np.concatenate(labels) ** 2)))
            if rms <= 0:
                continue
            ratio = float(rmse) / rms
            self.kf_force_fit = {
                "step": int(self.cur_batch), "on": "validation" if batches is valid_batches else "training",
                "force_rmse": float(rmse), "label_force_rms": rms, "ratio": ratio,
                "learned": ratio < PLATEAU_RATIO,
            }
            return

    def _train_step(self, batch: dict) -> None:
        """One energy update and N_f force updates (Algorithm 5, one batch)."""
        s = self.rlekf
        feed = self.get_feed_dict(batch, is_training=True)
        natoms = int(batch["natoms_vec"][0])
        label = np.asarray(batch["energy"], dtype=np.float64).reshape(-1)
        nframes = label.shape[0]
        # energy update
        c, _ = rlekf.energy_normalisers(natoms)
        self._update(
            [self.kf_energy_H, self.kf_energy], feed,
            lambda energy: rlekf.innovation(label, energy, s.pref_e, c),
            last=s.force_updates == 0, kind="energy",
        )
        if not s.force_updates:
            return
        # force updates, each on a fresh forward pass over newly drawn atoms
        groups = np.stack(
            [
                rlekf.draw_force_groups(self.kf_atom_rng, natoms, s.force_updates, s.atoms_per_update)
                for _ in range(nframes)
            ],
            axis=1,
        )  # (N_f, B, n_g)
        c, _ = rlekf.force_normalisers(natoms, s.atoms_per_update, s.force_normaliser == "natoms")
        for u, atoms in enumerate(groups):
            feed[self.kf_atoms] = atoms
            self._update(
                [self.kf_force_H, self.kf_force, self.kf_force_label], feed,
                lambda f_pred, f_lab: rlekf.innovation(f_lab, f_pred, s.pref_f, c),
                last=u == len(groups) - 1, kind="force",
            )

    def _update(self, fetches: list, feed: dict, innovation, last: bool, kind: str = "") -> None:
        """Evaluate H and the prediction, run the filter, add the increment to the weights.

        ``last`` also advances the global step (one per batch). With the environment variable
        ``ALKPU_RLEKF_TRACE`` naming a file, one JSON line per update is appended to it (kind,
        innovation, the noise term L*lambda, H^T P H in all and per block, the gain factor A,
        |H| and |delta w|, lambda).
        """
        tic = time.perf_counter()
        H, *pred = run_sess(self.sess, fetches, feed_dict=feed)
        toc = time.perf_counter()
        nu = innovation(*pred)
        lam = self.kf.lam
        delta = self.kf.update(H, nu)
        tac = time.perf_counter()
        trace = self.kf_trace
        if trace:
            row = {"step": int(self.cur_batch), "update": int(self.kf.nupdates), "kind": kind,
                   "innovation": nu, "lambda": lam, "H_norm": float(np.linalg.norm(H)),
                   "delta_norm": float(np.linalg.norm(delta)), **self.kf.last_update}
            with open(trace, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        apply = [self.kf_apply, self.kf_step] if last else self.kf_apply
        run_sess(self.sess, apply, feed_dict={self.kf_delta: delta})
        self.kf_timing["graph"] += (toc - tic) + (time.perf_counter() - tac)
        self.kf_timing["kalman"] += tac - toc
