"""extract_abc on the kinds of replies a chat model really gives: fenced, bare, headerless, several, none."""
from inference.abc_extract import extract_abc, first_abc, is_prose

TUNE = 'X:1\nT:Test\nM:4/4\nL:1/8\nK:D\n|:"D"DFAd fdAF|"G"GBdg "A"fedc:|\n'


def test_fenced_tune_with_prose_around():
    reply = f"Here is a tune in D major:\n\n```abc\n{TUNE}```\nEnjoy playing it!"
    assert extract_abc(reply) == [TUNE]


def test_tune_without_x_gets_one_and_prose_ends_it():
    reply = "Sure.\nT:Second\nM:3/4\nK:G\nGAB c2d | e3 d B2 |]\nThat is all, have fun.</s>"
    assert extract_abc(reply) == ["X:1\nT:Second\nM:3/4\nK:G\nGAB c2d | e3 d B2 |]\n"]


def test_several_tunes_in_order_and_eos_stops():
    two = TUNE + "\nX:2\nT:Other\nK:Am\nABcd e2a2|]\n</s> Assistant: ignored words here"
    tunes = extract_abc(two)
    assert len(tunes) == 2 and tunes[0] == TUNE and tunes[1].startswith("X:2\nT:Other\nK:Am\nABcd")
    # consecutive X: blocks without a blank line between them are still two tunes
    assert len(extract_abc(TUNE + "X:2\nK:C\nCDEF|]\n")) == 2


def test_no_tune_never_raises():
    for text in ["", None, "no music here", "K:", "X:1\nT:Header only\nK:C\n", "T:Title\nM:4/4\nnot music at all",
                 "```\n```", 123]:
        assert extract_abc(text) == []
    assert first_abc("nothing") is None


def test_body_fields_comments_and_lyrics_are_kept():
    tune = "X:3\nT:Song\nM:2/4\nL:1/8\nK:F\n% verse\nFA cA|w:la la la la\nP:B\n[K:C] cdec|]\n"
    assert extract_abc(tune) == [tune]


def test_prose_heuristic():
    assert is_prose("Here is a lovely tune")
    assert not is_prose('|:"Am"ABcd efge|uABc dcBA:|')
    assert not is_prose("cdef gabc | !trill!c4 |]")
