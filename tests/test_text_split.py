"""Splitting long input into sentence-sized pieces."""

from local_node.engine.text_split import split_text


def test_sentences_are_kept_whole_and_in_order():
    text = 'Hello there. How are you? I am fine! "Quoted." Last one'
    assert split_text(text, max_chars=20) == ["Hello there.", "How are you?", 'I am fine! "Quoted."', "Last one"]


def test_short_sentences_are_joined():
    assert split_text("One. Two. Three.") == ["One. Two. Three."]


def test_cjk_sentences():
    assert split_text("你好。今天天气很好！我们去公园吧？", max_chars=8) == ["你好。", "今天天气很好！", "我们去公园吧？"]


def test_long_sentences_are_cut_at_clauses_then_words_then_anywhere():
    pieces = split_text("alpha, beta, gamma, delta, epsilon, zeta, eta, theta", max_chars=20)
    assert all(len(p) <= 20 for p in pieces) and all(p.endswith(",") for p in pieces[:-1])
    assert split_text("x" * 45, max_chars=20) == ["x" * 20, "x" * 20, "x" * 5]


def test_nothing_is_lost():
    text = "First sentence here. " * 30 + "An unfinished tail with no stop"
    pieces = split_text(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(pieces).split() == text.split()


def test_blank_input():
    assert split_text("  \n ") == []
