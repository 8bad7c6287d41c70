"""Texts that exercise a tokenizer's pre-tokenizer: shared by the tests of every tokenizer family."""

TEXTS = {
    "empty": "",
    "english": "The quick brown fox jumps over the lazy dog. It's what they'd've done, isn't it?",
    "code": 'def f(x):\n    return {"a": [x ** 2 for x in range(10)]}  # comment\n\n\nclass A:\n\tpass\n',
    "numbers": "3.14159 1234567890 -42 1e-9 0x1F 2024-11-22 $1,000,000.00",
    "unicode": "naïve café — “quotes” … über Straße ½ ∑∫√ ÅÄÖ",
    "emoji": "hi 👋🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 ✨🔥",
    "cjk": "你好，世界！日本語のテキスト。한국어 문장입니다.",
    "whitespace": "a    b\n\n\n\n  c \t\t \r\n\r\n   \n" + " " * 100 + "end  \n",
}
