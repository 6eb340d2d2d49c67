from .classifier import CLASSIFIER_PATH, DIGITS_TEACHER_PATH, DigitsClassifier, load_digits_classifier
from .metrics import classify, evaluate_images, frechet_distance, within_class_diversity
