"""`dvc status` tells the truth only if every params key a stage's code reads is declared under its `params:` in
dvc.yaml. The keys are found statically: from each stage's main(), every project function it calls (through
cxr/ imports, with string arguments followed into `if stage == "train"` branches) is walked, tracking the params
dict `p`, the sections and values taken from it (`cfg = p["finetune"]`, `ds = params.dataset(p)`) and where they
flow. A declared `section` covers `section.*`; `datasets.${dataset}` covers the active dataset's entry.

Verified to fail on the old declaration: test_a_missing_declaration_is_reported feeds the check finetune's
params without `train.augment` and `train.class_weight` (as dvc.yaml had them before) and asserts both are
reported; the synthetic tests check each way a key can be read."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
ACTIVE = "${dataset}"


class Module:
    """A parsed project module: its functions and what its names import."""

    def __init__(self, name: str, source: str):
        self.name, self.tree = name, ast.parse(source)
        self.functions = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        self.modules: dict[str, str] = {}     # local name -> project module  (from cxr import training)
        self.names: dict[str, tuple[str, str]] = {}   # local name -> (module, function)  (from cxr.training import run_stage)
        package = name.rsplit(".", 1)[0] if "." in name else ""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(filter(None, [package, base]))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    if target.startswith(("cxr.", "stages.")):
                        self.modules[a.asname or a.name] = target
                    if base.startswith(("cxr", "stages")):
                        self.names[a.asname or a.name] = (base, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("cxr.") and a.asname:
                        self.modules[a.asname] = a.name


class Reads:
    """The params keys (tuples) the code reachable from one function reads."""

    def __init__(self, load):
        self.load, self.keys, self.seen = load, set(), set()
        self.bound: set[tuple] = set()   # values given a name: read whole unless something below them is read

    def all(self) -> set[tuple]:
        return self.keys | {b for b in self.bound if not any(k[: len(b)] == b and k != b for k in self.keys)}

    def function(self, module: Module, fn, bindings: dict):
        memo = (module.name, fn.name, tuple(sorted((k, repr(v)) for k, v in bindings.items())))
        if memo in self.seen:
            return
        self.seen.add(memo)
        self.block(module, fn.body, dict(bindings))

    def block(self, module, body, env) -> bool:
        """Walk the statements; True when the block certainly ends there (return, raise)."""
        for stmt in body:
            if self.statement(module, stmt, env):
                return True
        return False

    def statement(self, module, stmt, env) -> bool:
        if isinstance(stmt, ast.If):
            branch = self.decide(stmt.test, env)
            self.use(module, stmt.test, env)
            if branch is True:
                return self.block(module, stmt.body, env)
            if branch is False:
                return self.block(module, stmt.orelse, env)
            self.branches(module, [stmt.body, stmt.orelse], env)
        elif isinstance(stmt, ast.Assign):
            pairs = isinstance(stmt.value, ast.Tuple) and all(isinstance(t, ast.Tuple) for t in stmt.targets)
            value = None if pairs else self.value(module, stmt.value, env)
            for target in stmt.targets:
                self.bind(module, target, stmt.value, value, env)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.block(module, stmt.body, env)          # nested code runs with the enclosing names
        elif isinstance(stmt, ast.Try):
            self.branches(module, [stmt.body + stmt.orelse, *(h.body for h in stmt.handlers)], env)
            for handler in stmt.handlers:
                if handler.type is not None:
                    self.use(module, handler.type, env)
            self.block(module, stmt.finalbody, env)
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.stmt):
                    self.statement(module, child, env)
                elif isinstance(child, ast.expr):
                    self.use(module, child, env)
                elif isinstance(child, ast.withitem):           # with opened(path, cfg) as f: ...
                    self.use(module, child.context_expr, env)
            return isinstance(stmt, (ast.Return, ast.Raise))
        return False

    def branches(self, module, bodies, env) -> None:
        """Alternative blocks (an undecided if's two, a try's body and its handlers), each walked from the same
        names; a name the blocks leave bound differently is a value that may be either, so a params value among
        them is read whole and the name is forgotten."""
        ends = []
        for body in bodies:
            branch = dict(env)
            self.block(module, body, branch)
            ends.append(branch)
        for name in set(env).union(*ends):
            values = [e.get(name) for e in (env, *ends)]
            if any(v != values[0] for v in values):
                for v in values:
                    if v and v[0] == "key":
                        self.keys.add(v[1])
                env.pop(name, None)
        return False

    def bind(self, module, target, node, value, env):
        if isinstance(target, (ast.Subscript, ast.Attribute)):
            self.use(module, target, env, skip_self=True)   # inside[box_slices(size, box)] = ...: its calls run
        if isinstance(target, ast.Name):
            if value is not None:
                env[target.id] = value
                if value[0] == "key":
                    self.bound.add(value[1])
            else:
                env.pop(target.id, None)
        elif isinstance(target, ast.Tuple) and isinstance(node, ast.Tuple) and len(target.elts) == len(node.elts):
            for t, n in zip(target.elts, node.elts):
                self.bind(module, t, n, self.value(module, n, env), env)
        elif value is not None and value[0] == "key":
            self.keys.add(value[1])                     # unpacked or stored elsewhere: read whole

    def decide(self, test, env):
        """True/False for `name == "literal"` (or !=) with name bound to a string argument; None otherwise."""
        if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], (ast.Eq, ast.NotEq))
                and isinstance(test.left, ast.Name) and isinstance(test.comparators[0], ast.Constant)):
            bound = env.get(test.left.id)
            if bound and bound[0] == "const":
                same = bound[1] == test.comparators[0].value
                return same if isinstance(test.ops[0], ast.Eq) else not same
        return None

    def value(self, module, node, env):
        """("key", tuple) for a params value, ("const", str) for a string, None otherwise (reads recorded)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return ("const", node.value)
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Subscript):
            base = self.value(module, node.value, env)
            if base and base[0] == "key":
                index = self.value(module, node.slice, env)
                if index and index[0] == "const":
                    if base[1] == ("datasets", ACTIVE) and index[1] == "name":
                        return ("key", ("dataset",))    # params.dataset() adds the dataset's name
                    return ("key", base[1] + (index[1],))
                self.use(module, node.slice, env)
                self.keys.add(base[1])                  # a computed key: the whole value is read
                return None
            self.use(module, node, env, skip_self=True)
            return None
        if isinstance(node, ast.IfExp):
            branch = self.decide(node.test, env)
            self.use(module, node.test, env)
            if branch is not None:
                return self.value(module, node.body if branch else node.orelse, env)
            self.use(module, node.body, env)
            self.use(module, node.orelse, env)
            return None
        if isinstance(node, ast.Call):
            return self.call(module, node, env)
        self.use(module, node, env, skip_self=True)
        return None

    def call(self, module, node, env):
        func = node.func
        if isinstance(func, ast.Attribute):
            base = self.value(module, func.value, env)
            if base and base[0] == "key":
                if func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant):
                    for extra in node.args[1:]:
                        self.use(module, extra, env)
                    return ("key", base[1] + (node.args[0].value,))
                self.keys.add(base[1])                  # p.items(), cfg.copy(), ...: read whole
                return None
        if isinstance(func, ast.Call):                  # Dropout(rate)(x): the inner call runs first
            self.value(module, func, env)
        target = self.resolve(module, func)
        if target == ("cxr.params", "load"):
            return ("key", ())
        if target == ("cxr.params", "dataset"):
            self.keys.add(("dataset",))
            return ("key", ("datasets", ACTIVE))
        if target == ("cxr.params", "validate"):
            return None
        args = [self.value(module, a, env) for a in node.args]
        kwargs = {k.arg: self.value(module, k.value, env) for k in node.keywords}
        callee = self.load(target[0]) if target else None
        fn = callee.functions.get(target[1]) if callee else None
        if fn is None:                                  # outside the project, or not a function: reads whole
            for v in [*args, *kwargs.values()]:
                if v and v[0] == "key":
                    self.keys.add(v[1])
            return None
        names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        bindings = {n: v for n, v in zip(names, args) if v is not None}
        bindings.update({k: v for k, v in kwargs.items() if k and v is not None})
        self.function(callee, fn, bindings)
        return None

    def resolve(self, module, func):
        if isinstance(func, ast.Name):
            if func.id in module.functions:
                return (module.name, func.id)
            return module.names.get(func.id)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in module.modules:
            return (module.modules[func.value.id], func.attr)
        return None

    def use(self, module, node, env, skip_self=False):
        """An expression whose value is used as is: any params value in it is read whole."""
        if not skip_self:
            value = self.value(module, node, env)
            if value and value[0] == "key":
                self.keys.add(value[1])
            return
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.use(module, child, env)
            elif isinstance(child, ast.comprehension):
                self.use(module, child.iter, env)
                for cond in child.ifs:
                    self.use(module, cond, env)
            elif isinstance(child, ast.arguments):
                continue


def _project_loader(sources: dict[str, str] | None = None):
    cache: dict[str, Module | None] = {}

    def load(name: str) -> Module | None:
        if name not in cache:
            if sources is not None and name in sources:
                cache[name] = Module(name, sources[name])
            else:
                path = ROOT / (name.replace(".", "/") + ".py")
                cache[name] = Module(name, path.read_text()) if path.is_file() else None
        return cache[name]

    return load


def params_read(module: str, load=None, entry: str = "main") -> set[str]:
    """Dotted params keys read by `entry` of `module` and everything it calls in the project."""
    load = load or _project_loader()
    mod = load(module)
    reads = Reads(load)
    reads.function(mod, mod.functions[entry], {})
    return {".".join(k) for k in reads.all() if k}


def undeclared(read: set[str], declared: list[str]) -> set[str]:
    """Keys read but covered by no declared key (a declared key covers itself and everything below it)."""
    return {k for k in read if not any(k == d or k.startswith(d + ".") for d in declared)}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_params_key_a_stage_reads_is_declared(name):
    read = params_read(STAGES[name]["cmd"].split()[-1])
    assert read, f"{name}: no params reads found; the analysis lost track of the params dict"
    missing = undeclared(read, STAGES[name].get("params", []))
    assert not missing, f"stage {name} reads params {sorted(missing)} that dvc.yaml does not declare for it"


def test_a_missing_declaration_is_reported():
    declared = [k for k in STAGES["finetune"]["params"] if k not in ("train.augment", "train.class_weight")]
    missing = undeclared(params_read("stages.finetune"), declared)
    assert {"train.augment", "train.class_weight"} <= {".".join(k.split(".")[:2]) for k in missing}
    assert not any(k.startswith("finetune") for k in missing)


def test_stage_branches_are_told_apart():
    # run_stage("train") never reaches finetune(): train does not read the finetune section
    assert not any(k.startswith("finetune") for k in params_read("stages.train"))
    assert any(k.startswith("finetune.") for k in params_read("stages.finetune"))


def _synthetic(code: str, lib: str = "") -> set[str]:
    files = {"stages.x": textwrap.dedent(code), "cxr.lib": textwrap.dedent(lib)}
    return params_read("stages.x", _project_loader(files))


def test_each_way_of_reading_a_key_is_seen():
    lib = """
        def use(cfg, p, mode):
            if mode == "a":
                return cfg["alpha"], p["model"]["arch"]
            return p["never"]["read"]

        def whole(section):
            return sorted(section)
    """
    code = """
        from cxr import params
        from cxr.lib import use, whole

        def main():
            p = params.load()
            ds = params.dataset(p)
            cfg, rt = p["finetune"], p["runtime"]
            size = p["clean"]["image_size"]
            use(cfg, p, "a")
            whole(p["evaluate"])
            limit = p.get("download", {}).get("max_bytes")
            print(rt["xla"], ds["classes"], cfg.get("beta", 1))
    """
    assert _synthetic(code, lib) == {"dataset", "datasets.${dataset}.classes", "finetune.alpha", "finetune.beta",
                                     "model.arch", "clean.image_size", "evaluate", "download.max_bytes", "runtime.xla"}
    assert undeclared(_synthetic(code, lib), ["dataset", "datasets.${dataset}", "finetune", "model", "clean", "evaluate",
                                              "download", "runtime.xla"]) == set()
    assert undeclared(_synthetic(code, lib), ["finetune.alpha", "evaluate.x"]) >= {"finetune.beta", "evaluate"}


def test_reads_in_every_kind_of_statement_are_seen():
    # each of these was once invisible to the walk (checked against the earlier version of Reads)
    lib = """
        def build(weights, rate):
            if rate > 1:
                weights = "none"            # rebinds the name in one branch only: the key was read before that
            return Dropout(rate)(weights)   # a call on a call's result: both calls' arguments run

        def opened(entry, cfg):
            return cfg

        def slices(box):
            return box
    """
    code = """
        from cxr import params
        from cxr.lib import build, opened, slices

        def main():
            p = params.load()
            build(p["model"]["weights"], p["model"]["dropout"])
            with opened("x", p["download"]) as f:
                pass
            inside = {}
            inside[slices(p["external"]["probes"]["box"])] = True
            try:
                pass
            except OSError:
                print(p["external"]["missing"])
    """
    assert _synthetic(code, lib) == {"model.weights", "model.dropout", "download", "external.probes.box",
                                     "external.missing"}
