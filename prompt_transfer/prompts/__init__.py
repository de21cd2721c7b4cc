"""Prompt modules and their files.

A prompt module produces the rows prepended to the encoder input (the contract
is in `slot.py`): `free.Prompt` (prompt tuning's free array), `low_rank.LowRankPrompt`,
`bank.PromptBank` (one prompt per example, chosen by `task_ids`). Their
initialisers are in `initializers.py`; the numpy file layout and sidecar
(`prompt_info.json`) in `files.py`.
"""
