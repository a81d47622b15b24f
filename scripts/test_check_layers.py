#!/usr/bin/env python3
"""Tests of scripts/check_layers.py on small made-up crates (Python 3 standard library only).

Run: python3 scripts/test_check_layers.py
"""

import contextlib
import io
import os
import sys
import tempfile
import textwrap
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_layers  # noqa: E402


def crate(files):
    """A temporary crate root holding `files` ({path: source}); returns the TemporaryDirectory."""
    tmp = tempfile.TemporaryDirectory()
    for path, text in files.items():
        full = os.path.join(tmp.name, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
    return tmp


def run(fn, *args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn(*args)
    return code, out.getvalue()


def cycles(files):
    with crate(files) as root:
        return run(check_layers.check_cycles, root)


class Cycles(unittest.TestCase):
    def test_two_siblings_importing_each_other_fail_naming_both_imports(self):
        code, out = cycles({
            "src/lib.rs": "pub mod m;\n",
            "src/m/mod.rs": "pub mod a;\npub mod b;\n",
            "src/m/a.rs": "use super::b::Beta;\npub struct Alpha;\n",
            "src/m/b.rs": "pub struct Beta;\npub fn f() { let _ = crate::m::a::Alpha; }\n",
        })
        self.assertEqual(code, 1, out)
        self.assertIn("cycle 1 (2 files): src/m/a.rs, src/m/b.rs", out)
        self.assertIn("src/m/a.rs -> src/m/b.rs: super::b::Beta (:1)", out)
        self.assertIn("src/m/b.rs -> src/m/a.rs: crate::m::a::Alpha (:2)", out)

    def test_a_child_importing_its_folders_reexport_is_a_cycle(self):
        code, out = cycles({
            "src/lib.rs": "pub mod m;\n",
            "src/m/mod.rs": "pub mod a;\npub mod b;\npub use b::Config;\n",
            "src/m/a.rs": "use crate::m::Config;\n",
            "src/m/b.rs": "pub struct Config;\n",
        })
        self.assertEqual(code, 0, out)  # a -> mod.rs -> b: no loop
        code, out = cycles({
            "src/lib.rs": "pub mod m;\n",
            "src/m/mod.rs": "pub mod a;\npub use a::Model;\n",
            "src/m/a.rs": "use crate::m::Config;\npub struct Model;\n",
        })
        self.assertEqual(code, 1, out)  # a -> mod.rs (Config) and mod.rs -> a (re-export)
        self.assertIn("src/m/mod.rs -> src/m/a.rs: a::Model", out)

    def test_a_longer_loop_is_one_component(self):
        code, out = cycles({
            "src/lib.rs": "mod a;\nmod b;\nmod c;\n",
            "src/a.rs": "use crate::b::x;\n",
            "src/b.rs": "pub fn x() { crate::c::y() }\n",
            "src/c.rs": "pub fn y() { let _ = crate::a::Z::new(); }\n",
        })
        self.assertEqual(code, 1, out)
        self.assertIn("cycle 1 (3 files): src/a.rs, src/b.rs, src/c.rs", out)
        self.assertIn("src/c.rs -> src/a.rs: crate::a::Z::new (:1)", out)

    def test_comments_strings_and_test_code_are_not_imports(self):
        code, out = cycles({
            "src/lib.rs": "pub mod a;\npub mod b;\n",
            "src/a.rs": "use crate::b::B;\npub struct A;\n",
            "src/b.rs": """\
                //! Docs may name [`crate::a::A`].
                /* a block comment: use crate::a::A; /* nested */ still a comment */
                pub struct B;
                pub fn s() -> &'static str { "crate::a::A" }
                pub fn c() -> char { '"' }
                pub fn r() -> &'static str { r#"use crate::a::A;"# }
                #[cfg(test)]
                mod tests {
                    use crate::a::A;
                    #[test]
                    fn t() { let _ = A; }
                }
                #[cfg(test)]
                use crate::a::A as _Unused;
            """,
        })
        self.assertEqual(code, 0, out)
        self.assertIn("no cycles", out)

    def test_inline_paths_aliases_and_child_modules_count(self):
        # b reaches a through `use crate::m; m::a::f()`; mod.rs through a child path `a::`.
        code, out = cycles({
            "src/lib.rs": "pub mod m;\n",
            "src/m/mod.rs": "pub mod a;\npub mod b;\npub fn g() { a::f() }\n",
            "src/m/a.rs": "pub fn f() { crate::m::b::h() }\n",
            "src/m/b.rs": "use crate::m;\npub fn h() {}\npub fn k() { m::a::f() }\n",
        })
        self.assertEqual(code, 1, out)
        self.assertIn("src/m/b.rs -> src/m/a.rs: m::a::f (:3)", out)

    def test_super_in_an_inline_module_is_the_file_itself(self):
        # Read as the folder's `super`, `inner`'s import would close a loop with the re-export.
        code, out = cycles({
            "src/lib.rs": "pub mod m;\n",
            "src/m/mod.rs": "pub mod a;\npub use a::A;\n",
            "src/m/a.rs": "pub struct A;\nmod inner { use super::A; }\n",
        })
        self.assertEqual(code, 0, out)

    def test_the_binary_crate_is_its_own_tree(self):
        # `crate::` in the binary's modules is the binary; `gps_seg::` is the library.
        code, out = cycles({
            "src/lib.rs": "pub mod util;\n",
            "src/util.rs": "pub fn u() {}\n",
            "src/main.rs": "mod cli;\nfn main() { cli::run() }\n",
            "src/cli/mod.rs": "pub mod x;\npub fn run() { x::go(); gps_seg::util::u() }\n",
            "src/cli/x.rs": "pub fn go() { crate::cli::run() }\n",
        })
        self.assertEqual(code, 1, out)
        self.assertIn("cycle 1 (2 files): src/cli/mod.rs, src/cli/x.rs", out)
        self.assertNotIn("src/util.rs ->", out)


class FunctionLength(unittest.TestCase):
    def test_long_functions_are_listed_with_file_line_name_and_length(self):
        body = "\n".join(f"    let _v{i} = {i};" for i in range(4))
        with crate({
            "src/cli/a.rs": f"""\
pub fn short() {{
    let _ = 1;
}}

pub(crate) async fn long_one(x: usize)
    -> usize
{{
{body}
    x
}}

trait T {{
    fn declared(&self);
}}

#[cfg(test)]
mod tests {{
    fn long_test() {{
{body}
{body}
    }}
}}
""",
            "src/train/b.rs": "fn one_line() { }\n",
        }) as root:
            code, out = run(check_layers.check_fn_lengths, root, 5, ["src/cli", "src/train"])
            self.assertEqual(code, 1, out)
            self.assertIn("src/cli/a.rs:5 long_one: 9 lines", out)
            self.assertNotIn("short", out)
            self.assertNotIn("declared", out)
            self.assertNotIn("long_test", out)
            code, out = run(check_layers.check_fn_lengths, root, 9, ["src/cli", "src/train"])
            self.assertEqual(code, 0, out)
            self.assertIn("3 functions", out)


if __name__ == "__main__":
    unittest.main()
