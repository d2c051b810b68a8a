"""Text utilities shared by evaluation and extraction: covering a long text with windows a model can read."""
import re

_WS = re.compile(r"\s+")


def make_windows(text: str, count_tokens, max_tokens: int, overlap: float = 0.25) -> list[tuple[int, int]]:
    """Cover text with [start, end) windows of at most max_tokens tokens each (count_tokens(str) -> int),
    consecutive windows sharing about `overlap` of their length, cut at whitespace where possible. A clause
    shorter than the overlap is therefore whole in at least one window."""
    assert 0 <= overlap < 0.9 and max_tokens > 0
    n_tok = count_tokens(text)
    if n_tok <= max_tokens:
        return [(0, len(text))]
    chars = max(32, int(max_tokens * len(text) / n_tok * 0.95))  # chars per window from the average token size
    windows, start = [], 0
    while True:
        end = min(len(text), start + chars)
        while True:
            if end < len(text):  # end after the last space / newline of the window's second half
                half = start + (end - start) // 2
                cut = max(text.rfind(" ", half, end), text.rfind("\n", half, end))
                end = cut + 1 if cut > start else end
            if count_tokens(text[start:end]) <= max_tokens or end - start <= 8:
                break
            end = start + int((end - start) * 0.9)
        windows.append((start, end))
        if end >= len(text):
            return windows
        nxt = max(start + 1, end - int((end - start) * overlap))
        m = _WS.search(text, nxt, end)  # start the next window at a word
        start = m.end() if m and m.end() < end else nxt
