"""slca: class-incremental learning on pre-trained vision models with SLCA (Slow Learner + Classifier Alignment)."""

__version__ = "0.1.0"
