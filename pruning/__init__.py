"""evoprune.pruning"""
