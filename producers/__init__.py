"""Producers: replay benchmark protocols as partial-modal event streams at a set rate."""
