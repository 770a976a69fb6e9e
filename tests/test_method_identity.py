"""Methods describe themselves (issue 25, item 4): every registered method declares display_name and family in its own
class body, registration refuses one that does not, and the light catalog reports read (bench.registry.method_catalog,
parsed from the source) equals the imported classes without importing torch."""
import subprocess
import sys

import pytest

from bench.registry import Method, list_methods, method_catalog, method_class, register_method


def test_catalog_equals_the_registered_classes():
    catalog = method_catalog()
    assert sorted(catalog) == list_methods()
    for name in list_methods():
        cls = method_class(name)
        assert (catalog[name].display_name, catalog[name].family) == (cls.display_name, cls.family), name
        assert dict(catalog[name].paper_names) == cls.paper_names, name
        assert cls.display_name.strip() and cls.family.strip()
    # every family names a method of its own family, or is the compositions' label
    for info in catalog.values():
        assert info.family == "composition" or catalog[info.family].family == info.family, info
    assert catalog["actvar-tokens"].family == "actvar" and catalog["tome"].family == "tome"


def test_a_method_without_display_name_or_family_is_refused():
    class Nameless(Method):
        kind = "token"
        family = "nameless"
    with pytest.raises(RuntimeError, match="'nameless-test'.*declares no display_name.*display_name and family"):
        register_method("nameless-test")(Nameless)

    class Inherits(method_class("fastvar")):   # a parent's attributes do not name the subclass
        pass
    with pytest.raises(RuntimeError, match="declares no display_name"):
        register_method("inherits-test")(Inherits)

    class Blank(Method):
        kind = "token"
        display_name = "Blank"
        family = " "
    with pytest.raises(RuntimeError, match="declares no family"):
        register_method("blank-test")(Blank)
    assert not {"nameless-test", "inherits-test", "blank-test"} & set(list_methods())


def test_reports_name_methods_without_importing_torch():
    code = ("import sys, reports\n"
            "from reports import data as D\n"
            "from reports.field import family_name\n"
            "assert D.nice_method('dmoe') == 'DMoE-VAR' and family_name('tome') == 'ToMe (token merging)'\n"
            "assert D.nice_method('not-a-method') == 'not-a-method'\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_paper_table_rows_come_from_the_methods():
    """The ActVAR tables' row labels (the paper's words) are declared by the methods, not tabled in reports/."""
    from reports.data import paper_rows
    assert paper_rows("actvar-table-3") == {"actvar": "w/ DW & AT", "actvar-experts": "w/o AT",
                                            "actvar-tokens": "w/o DW"}
    assert paper_rows("actvar-table-5")["pruned-ffn"] == "Static weight pruning"
    assert paper_rows("no-such-table") == {}
