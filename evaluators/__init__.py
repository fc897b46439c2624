"""evoprune.evaluators"""
