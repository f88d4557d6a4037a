"""The encoder role: arrivals in, one database code per (item, modality) out, never re-hashed.

``role`` codes each batch with the model version it holds (exactly once through transactions where the
broker has them); ``intents`` is the at-least-once mode's record of which version codes which offsets,
written before the codes so a redone batch gets the same codes.
"""
