"""Code the tests share (loaders, helpers, scripts they run); no tests here."""
