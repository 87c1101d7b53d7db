"""Solver adapters: one solver-neutral MILP (:class:`MilpModel`), solved by HiGHS, Gurobi or CBC.

The formulation (planner.milp) is written once into a :class:`MilpModel`; ``solve`` hands it to
the chosen solver.  Gurobi is used by ``auto`` only when ``gurobipy`` imports, the model fits the
size-limited licence its wheel ships, and the licence accepts it; otherwise HiGHS, and CBC
(through PuLP) when HiGHS is not installed.  Every adapter is quiet and deterministic (one
thread, fixed seed).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import math
import os
import time
import warnings
from dataclasses import dataclass, field

from ppipe_trt.errors import SolverError

_INF = math.inf


@dataclass(slots=True)
class MilpModel:
    """Maximise ``cost . x`` subject to ``row_lower <= A x <= row_upper`` and column bounds.

    Rows are sparse (column indices, coefficients).  Owned by the caller; adapters only read it.
    """

    col_lower: list[float] = field(default_factory=list)
    col_upper: list[float] = field(default_factory=list)
    col_cost: list[float] = field(default_factory=list)
    col_integer: list[bool] = field(default_factory=list)
    col_names: list[str] = field(default_factory=list)
    row_index: list[list[int]] = field(default_factory=list)
    row_value: list[list[float]] = field(default_factory=list)
    row_lower: list[float] = field(default_factory=list)
    row_upper: list[float] = field(default_factory=list)

    def add_col(self, name: str, lower: float = 0.0, upper: float = _INF, cost: float = 0.0,
                integer: bool = False) -> int:
        self.col_lower.append(lower)
        self.col_upper.append(upper)
        self.col_cost.append(cost)
        self.col_integer.append(integer)
        self.col_names.append(name)
        return len(self.col_lower) - 1

    def add_row(self, terms: dict[int, float], lower: float = -_INF, upper: float = _INF) -> int:
        items = sorted((i, v) for i, v in terms.items() if v != 0.0)
        self.row_index.append([i for i, _ in items])
        self.row_value.append([v for _, v in items])
        self.row_lower.append(lower)
        self.row_upper.append(upper)
        return len(self.row_lower) - 1

    @property
    def num_cols(self) -> int:
        return len(self.col_lower)

    @property
    def num_rows(self) -> int:
        return len(self.row_lower)

    @property
    def num_integer(self) -> int:
        return sum(self.col_integer)


@dataclass(frozen=True, slots=True)
class MilpResult:
    """A solver's answer.  ``mip_gap``: relative gap of the returned solution (0 when proven
    optimal to the requested tolerance and the solver reports none)."""

    values: tuple[float, ...]
    objective: float
    mip_gap: float
    optimal: bool
    status: str
    solver: str
    solve_s: float


def gurobi_available() -> bool:
    return importlib.util.find_spec("gurobipy") is not None


def highs_available() -> bool:
    return importlib.util.find_spec("highspy") is not None


def solve(model: MilpModel, solver: str = "auto", *, time_limit_s: float = 60.0,
          mip_rel_gap: float = 1e-4, start: list[float] | None = None,
          gurobi_max_vars: int = 2000, gurobi_max_constraints: int = 2000,
          highs_options: dict | None = None, node_limit: int | None = None) -> MilpResult:
    """Solve ``model`` (maximisation) with ``solver``; ``start`` is an optional feasible point.

    ``highs_options``: extra HiGHS options (name -> value), for experiments.  ``node_limit``:
    stop after this many branch-and-bound nodes (a deterministic work limit, unlike time).
    """
    if solver == "auto":
        fits = model.num_cols <= gurobi_max_vars and model.num_rows <= gurobi_max_constraints
        if fits and gurobi_available():
            try:
                return _solve_gurobi(model, time_limit_s, mip_rel_gap, start, node_limit)
            except _LicenceRefused:
                pass
        solver = "highs" if highs_available() else "cbc"
    if solver == "highs":
        if not highs_available():
            raise SolverError("solver 'highs' requested but highspy is not installed "
                              "(pip install highspy), or use --solver cbc")
        return _solve_highs(model, time_limit_s, mip_rel_gap, start, highs_options, node_limit)
    if solver == "gurobi":
        if not gurobi_available():
            raise SolverError("solver 'gurobi' requested but gurobipy is not installed")
        try:
            return _solve_gurobi(model, time_limit_s, mip_rel_gap, start, node_limit)
        except _LicenceRefused as exc:
            raise SolverError(
                f"Gurobi refused the model ({model.num_cols} variables, {model.num_rows} "
                f"constraints): {exc}; the pip licence allows {gurobi_max_vars} variables and "
                f"{gurobi_max_constraints} constraints; use --solver highs") from None
    if solver == "cbc":
        return _solve_cbc(model, time_limit_s, mip_rel_gap, node_limit)
    raise SolverError(f"unknown solver {solver!r}; expected auto, highs, gurobi or cbc")


class _LicenceRefused(Exception):
    pass


def _highs_instance(model: MilpModel, time_limit_s: float, integer: bool):
    """A quiet, single-threaded Highs holding ``model`` (its LP relaxation if not ``integer``)."""
    import highspy
    import numpy as np

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("log_to_console", False)
    h.setOptionValue("time_limit", float(time_limit_s))
    h.setOptionValue("random_seed", 0)
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    lp.num_col_ = model.num_cols
    lp.num_row_ = model.num_rows
    lp.col_cost_ = np.asarray(model.col_cost, dtype=float)
    lp.col_lower_ = np.asarray(model.col_lower, dtype=float)
    lp.col_upper_ = np.asarray(model.col_upper, dtype=float)
    lp.row_lower_ = np.asarray(model.row_lower, dtype=float)
    lp.row_upper_ = np.asarray(model.row_upper, dtype=float)
    lp.sense_ = highspy.ObjSense.kMaximize
    starts = np.zeros(model.num_rows + 1, dtype=np.int32)
    starts[1:] = np.cumsum([len(r) for r in model.row_index])
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.num_col_ = model.num_cols
    lp.a_matrix_.num_row_ = model.num_rows
    lp.a_matrix_.start_ = starts
    lp.a_matrix_.index_ = np.asarray([i for r in model.row_index for i in r], dtype=np.int32)
    lp.a_matrix_.value_ = np.asarray([v for r in model.row_value for v in r], dtype=float)
    if integer:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i
                           else highspy.HighsVarType.kContinuous for i in model.col_integer]
    h.passModel(lp)
    return h


def solve_lp_relaxation(model: MilpModel, time_limit_s: float = 60.0
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Column values and row duals of ``model``'s LP relaxation (HiGHS)."""
    if not highs_available():
        raise SolverError("the LP screening of candidates needs highspy (pip install highspy)")
    h = _highs_instance(model, time_limit_s, integer=False)
    h.run()
    sol = h.getSolution()
    if not sol.value_valid or not sol.dual_valid:
        raise SolverError(f"HiGHS could not solve the LP relaxation "
                          f"({h.modelStatusToString(h.getModelStatus())})")
    return tuple(sol.col_value), tuple(sol.row_dual)


# ---- HiGHS ---------------------------------------------------------------------------------

def _solve_highs(model: MilpModel, time_limit_s: float, gap: float,
                 start: list[float] | None, options: dict | None = None,
                 node_limit: int | None = None) -> MilpResult:
    import highspy

    h = _highs_instance(model, time_limit_s, integer=True)
    h.setOptionValue("mip_rel_gap", float(gap))
    if node_limit is not None:
        h.setOptionValue("mip_max_nodes", int(node_limit))
    for name, value in (options or {}).items():
        h.setOptionValue(name, value)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = list(start)
        sol.value_valid = True
        h.setSolution(sol)
    t0 = time.perf_counter()
    h.run()
    elapsed = time.perf_counter() - t0
    status = h.getModelStatus()
    info = h.getInfo()
    name = h.modelStatusToString(status)
    if info.primal_solution_status != 2:  # kSolutionStatusFeasible
        raise SolverError(f"HiGHS found no feasible solution ({name}) in {elapsed:.1f} s")
    values = tuple(float(v) for v in h.getSolution().col_value)
    optimal = status == highspy.HighsModelStatus.kOptimal
    mip_gap = float(info.mip_gap) if model.num_integer else 0.0
    if not math.isfinite(mip_gap):
        mip_gap = 1.0
    return MilpResult(values, float(info.objective_function_value), max(0.0, mip_gap), optimal,
                      name, "highs", elapsed)


# ---- Gurobi --------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_stdout():
    """Silence the licence banner Gurobi prints from C when an environment starts."""
    try:
        fd = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(io.StringIO()):
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(fd, 1)
        os.close(fd)


def _solve_gurobi(model: MilpModel, time_limit_s: float, gap: float,
                  start: list[float] | None, node_limit: int | None = None) -> MilpResult:
    import gurobipy as gp
    from gurobipy import GRB

    try:
        with _quiet_stdout():
            env = gp.Env(empty=True)
            env.setParam("OutputFlag", 0)
            env.start()
    except gp.GurobiError as exc:
        raise _LicenceRefused(str(exc)) from None
    try:
        m = gp.Model(env=env)
        m.Params.TimeLimit = float(time_limit_s)
        m.Params.MIPGap = float(gap)
        m.Params.Threads = 1
        m.Params.Seed = 0
        if node_limit is not None:
            m.Params.NodeLimit = float(node_limit)
        xs = [m.addVar(lb=lo, ub=(GRB.INFINITY if math.isinf(up) else up), obj=c,
                       vtype=GRB.INTEGER if integer else GRB.CONTINUOUS, name=f"x{i}")
              for i, (lo, up, c, integer) in enumerate(zip(
                  model.col_lower, model.col_upper, model.col_cost, model.col_integer))]
        for idx, vals, lo, up in zip(model.row_index, model.row_value, model.row_lower,
                                     model.row_upper):
            expr = gp.LinExpr(vals, [xs[i] for i in idx])
            if lo == up:
                m.addLConstr(expr, GRB.EQUAL, lo)
                continue
            if not math.isinf(up):
                m.addLConstr(expr, GRB.LESS_EQUAL, up)
            if not math.isinf(lo):
                m.addLConstr(expr, GRB.GREATER_EQUAL, lo)
        m.ModelSense = GRB.MAXIMIZE
        if start is not None:
            for x, v in zip(xs, start):
                x.Start = v
        t0 = time.perf_counter()
        try:
            m.optimize()
        except gp.GurobiError as exc:
            raise _LicenceRefused(str(exc)) from None
        elapsed = time.perf_counter() - t0
        if m.SolCount == 0:
            raise SolverError(f"Gurobi found no feasible solution (status {m.Status}) in "
                              f"{elapsed:.1f} s")
        values = tuple(float(x.X) for x in xs)
        mip_gap = float(m.MIPGap) if m.IsMIP else 0.0
        return MilpResult(values, float(m.ObjVal), mip_gap if math.isfinite(mip_gap) else 1.0,
                          m.Status == GRB.OPTIMAL, str(m.Status), "gurobi", elapsed)
    finally:
        with contextlib.suppress(Exception):
            m.dispose()
        env.dispose()


# ---- CBC (PuLP) ----------------------------------------------------------------------------

def _solve_cbc(model: MilpModel, time_limit_s: float, gap: float,
               node_limit: int | None = None) -> MilpResult:
    try:
        import pulp
    except ImportError:
        raise SolverError("solver 'cbc' requested but PuLP is not installed (pip install pulp)") \
            from None
    prob = pulp.LpProblem("ppipe_plan", pulp.LpMaximize)
    # PuLP >= 3 attaches variables through the problem; older releases construct them.
    make_var = getattr(prob, "add_variable", None) or pulp.LpVariable
    xs = [make_var(f"x{i}", lowBound=lo, upBound=None if math.isinf(up) else up,
                   cat=pulp.LpInteger if integer else pulp.LpContinuous)
          for i, (lo, up, integer) in enumerate(zip(model.col_lower, model.col_upper,
                                                     model.col_integer))]
    prob += pulp.lpSum(c * x for c, x in zip(model.col_cost, xs) if c != 0.0)
    for r, (idx, vals, lo, up) in enumerate(zip(model.row_index, model.row_value,
                                                 model.row_lower, model.row_upper)):
        expr = pulp.lpSum(v * xs[i] for i, v in zip(idx, vals))
        if lo == up:
            prob += (expr == lo), f"r{r}"
            continue
        if not math.isinf(up):
            prob += (expr <= up), f"r{r}u"
        if not math.isinf(lo):
            prob += (expr >= lo), f"r{r}l"
    with warnings.catch_warnings():
        # PuLP 3 deprecates the bundled CBC binary it still ships; it is what we want here.
        warnings.simplefilter("ignore", DeprecationWarning)
        cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=float(time_limit_s), gapRel=float(gap),
                                threads=1, options=["randomSeed 0", "randomCbcSeed 0"]
                                + ([f"maxNodes {int(node_limit)}"] if node_limit else []))
    t0 = time.perf_counter()
    try:
        status = prob.solve(cmd)
    except pulp.PulpSolverError as exc:
        raise SolverError(f"CBC failed: {exc}") from None
    elapsed = time.perf_counter() - t0
    name = pulp.LpStatus.get(status, str(status))
    if status != pulp.LpStatusOptimal or any(x.varValue is None for x in xs):
        raise SolverError(f"CBC found no optimal solution ({name}) in {elapsed:.1f} s")
    values = tuple(float(x.varValue) for x in xs)
    objective = sum(c * v for c, v in zip(model.col_cost, values))
    # PuLP does not expose CBC's final gap; "Optimal" means within the requested gapRel.
    return MilpResult(values, objective, float(gap), True, name, "cbc", elapsed)
