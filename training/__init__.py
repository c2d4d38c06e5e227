"""tunesmith.training"""
