"""Taxonomy: identity by lineage path, stable ids, lookups, prompts, JSON round trip."""
import pytest

from taxadiffusion.taxonomy import Taxonomy

RANKS = ("class", "order", "family", "genus", "species")
LINEAGES = [
    ("Actinopterygii", "Perciformes", "Chaetodontidae", "Chaetodon", "auriga"),
    ("Actinopterygii", "Perciformes", "Chaetodontidae", "Chaetodon", "auriga"),
    ("Actinopterygii", "Perciformes", "Chaetodontidae", "Chaetodon", "lunula"),
    ("Actinopterygii", "Perciformes", "Chaetodontidae", "Amphichaetodon", "howensis"),
    # the same epithet under another genus: a different species
    ("Actinopterygii", "Perciformes", "Pomacanthidae", "Centropyge", "auriga"),
    # a genus name reused in another family: a different genus
    ("Actinopterygii", "Gobiiformes", "Gobiidae", "Chaetodon", "fakeus"),
]


@pytest.fixture
def tax():
    return Taxonomy(RANKS, LINEAGES, upper={"Actinopterygii": ("Animalia", "Chordata")},
                    upper_ranks=("kingdom", "phylum"))


def test_identity_is_the_lineage_path(tax):
    assert tax.summary() == {"class": 1, "order": 2, "family": 3, "genus": 4, "species": 5}
    aurigas = tax.find("auriga", rank="species")
    assert {t.binomial for t in aurigas} == {"Chaetodon auriga", "Centropyge auriga"}
    assert len(tax.find("Chaetodon", rank="genus")) == 2


def test_ids_do_not_depend_on_row_order(tax):
    other = Taxonomy(RANKS, list(reversed(LINEAGES)))
    for level in range(5):
        assert [t.path for t in tax.vocab(level)] == [t.path for t in other.vocab(level)]
    sp = tax.lookup("Chaetodon lunula")
    assert tax.ids(sp) == other.ids(other.lookup("Chaetodon lunula"))
    assert tax.taxon(4, tax.id(sp)) == sp


def test_lookup_binomial_rank_and_errors(tax):
    sp = tax.lookup("Chaetodon auriga")
    assert sp.path == LINEAGES[0] and sp.rank == "species"
    assert tax.lookup("Chaetodontidae").rank == "family"
    with pytest.raises(KeyError, match="ambiguous"):
        tax.lookup("Chaetodon")  # genus in two families
    g = tax.lookup("Actinopterygii > Gobiiformes > Gobiidae > Chaetodon")
    assert [c.name for c in tax.children(g)] == ["fakeus"]
    with pytest.raises(KeyError, match="closest names: Chaetodon auriga"):
        tax.lookup("Chaetodon aurigo")


def test_counts_parents_children_few_shot(tax):
    fam = tax.lookup("Chaetodontidae")
    assert tax.count(fam) == 4
    assert tax.count(tax.lookup("Chaetodon auriga")) == 2
    assert tax.parent(tax.lookup("Chaetodon lunula")).path == LINEAGES[0][:4]
    assert {c.name for c in tax.children(fam)} == {"Chaetodon", "Amphichaetodon"}
    assert len(tax.few_shot_species(1)) == 4 and len(tax.few_shot_species(5)) == 5


def test_prompts_and_bioclip_text(tax):
    sp = tax.lookup("Chaetodon auriga")
    assert tax.prompts(sp) == ["class: Actinopterygii", "order: Perciformes",
                               "family: Chaetodontidae", "genus: Chaetodon",
                               "species: Chaetodon auriga"]
    assert tax.bioclip_text(sp) == ("a photo of Animalia Chordata Actinopterygii Perciformes "
                                    "Chaetodontidae Chaetodon auriga.")
    paper = Taxonomy(RANKS, LINEAGES, species_prompt="epithet")
    assert paper.prompt(paper.lookup("Chaetodon auriga")) == "specific_epithet: auriga"


def test_json_round_trip(tmp_path, tax):
    tax.save(tmp_path / "taxonomy.json")
    back = Taxonomy.load(tmp_path / "taxonomy.json")
    assert back == tax
    sp = back.lookup("Centropyge auriga")
    assert back.ids(sp) == tax.ids(tax.lookup("Centropyge auriga"))
    assert back.count(sp) == 1 and back.bioclip_text(sp).startswith("a photo of Animalia")


def test_truncated_lineages_count_only_their_levels():
    tax = Taxonomy(RANKS, [LINEAGES[0], LINEAGES[0][:3]])
    assert tax.count(tax.lookup("Chaetodontidae")) == 2
    assert tax.count(tax.lookup("Chaetodon auriga")) == 1


def test_bad_ranks_rejected():
    with pytest.raises(ValueError, match="ordered"):
        Taxonomy(("species", "genus"), [])


@pytest.mark.parametrize("name", ["Aves > Corvidae", " Corvus", "Corvus ", ""])
def test_names_lookup_cannot_reach_are_refused(name):
    # " > " joins lineages in lookup(); find() strips each name: such a taxon could never be sampled
    with pytest.raises(ValueError, match="lineage"):
        Taxonomy(("genus", "species"), [(name, "corax")])
    with pytest.raises(ValueError, match="lineage"):
        Taxonomy.from_dict({"ranks": ["genus"], "counts": [[[name], 1]]})
