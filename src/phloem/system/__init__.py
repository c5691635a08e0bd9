"""The host and the vocabulary every layer shares: settings, the data dir's layout, uids,
limits, input rules, tied children, /proc and file helpers. Imports nothing of phloem."""
